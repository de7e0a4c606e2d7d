"""The official SQuAD v1.1 and v2.0 EM/F1 on hand-checked examples; v2.0's best-threshold sweep
against every threshold and against evaluate-v2.0.py's own."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from train.data import QARecord
from train.metrics import (best_thresholds, exact_match, f1, f1_v2, normalize_answer, squad_scores,
                           squad_v2_scores)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("The Denver Broncos", "denver broncos"),
        ("  an   apple, a PEAR!  ", "apple pear"),
        ("theory of the atom", "theory of atom"),  # "the" inside "theory" survives (\b)
        ("A.B.C.", "abc"),  # punctuation is deleted, not replaced by a space
        ("Saint-Denis", "saintdenis"),
        ("'the' answer", "answer"),  # quotes go first, then the article
        ("", ""),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_exact_match_ignores_case_punctuation_articles():
    assert exact_match("the Eiffel Tower.", "Eiffel tower") == 1.0
    assert exact_match("Eiffel", "Eiffel Tower") == 0.0
    assert exact_match("", "") == 1.0


def test_f1_partial_overlap_by_hand():
    # pred "cat sat" (2 tokens) vs gold "cat sat on mat" (4): P=1, R=1/2 -> F1=2/3.
    assert f1("the cat sat", "The cat sat on the mat") == pytest.approx(2 / 3)
    # bag of tokens: pred "b b" vs gold "b b b": overlap 2, P=1, R=2/3 -> F1=0.8.
    assert f1("a b b", "b b b") == pytest.approx(0.8)
    # pred "x y z w" vs gold "y q": overlap 1, P=1/4, R=1/2 -> F1=1/3.
    assert f1("x y z w", "y q") == pytest.approx(1 / 3)


def test_f1_zero_without_overlap_or_when_empty():
    assert f1("Paris", "London") == 0.0
    assert f1("", "London") == 0.0
    assert f1("the", "a") == 0.0  # both normalise to nothing: no overlap -> 0 (official)


def _rec(id_, *answers):
    return QARecord(id=id_, context=" ".join(answers), question="q?", answers=answers,
                    answer_starts=tuple(0 for _ in answers))


def test_squad_scores_max_over_golds_and_missing_predictions():
    records = [
        _rec("1", "Denver Broncos", "Broncos"),
        _rec("2", "Santa Clara, California"),
        _rec("3", "1990"),
    ]
    preds = {"1": "broncos", "2": "Santa Clara", "unknown": "ignored"}  # "3" unanswered -> 0
    scores = squad_scores(preds, records)
    # EM: 1 + 0 + 0 over 3. F1: 1 + (P=1, R=2/3 -> 0.8) + 0 over 3.
    assert scores["exact_match"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(100 * 1.8 / 3)


def test_squad_scores_empty():
    assert squad_scores({}, []) == {"exact_match": 0.0, "f1": 0.0}


def test_squad_v2_scores_by_hand():
    """evaluate-v2.0.py: an unanswerable question's only gold is the empty answer; empty against
    non-empty scores 0, empty against empty 1 (EM and F1); gold answers that normalise to nothing
    are dropped; HasAns / NoAns split by whether the record has answers."""
    records = [
        _rec("a", "the cat", "cat"),
        _rec("c", "Paris"),
        _rec("d", "The"),  # normalises to nothing: its gold becomes "" (still a HasAns question)
        _rec("e", "Paris"),
        QARecord("b", "ctx", "q?", (), ()),
        QARecord("b2", "ctx", "q?", (), ()),
    ]
    preds = {"a": "a cat", "c": "", "d": "", "e": "Paris France", "b": "", "b2": "something"}
    s = squad_v2_scores(preds, records)
    # EM: a 1, c 0, d 1, e 0 | b 1, b2 0. F1: a 1, c 0, d 1, e 2*(1/2*1)/(3/2) = 2/3 | b 1, b2 0.
    assert s["total"] == 6 and s["has_answer"]["total"] == 4 and s["no_answer"]["total"] == 2
    assert s["exact_match"] == pytest.approx(100 * 3 / 6) and s["f1"] == pytest.approx(100 * (3 + 2 / 3) / 6)
    assert s["has_answer"]["exact_match"] == pytest.approx(50) and s["has_answer"]["f1"] == pytest.approx(
        100 * (2 + 2 / 3) / 4)
    assert s["no_answer"] == {"exact_match": 50.0, "f1": 50.0, "total": 2}
    assert f1_v2("the", "a") == 1.0 and f1("the", "a") == 0.0  # where v2.0 and v1.1 part
    # Without unanswerable records only the HasAns part is reported; a missing prediction scores 0.
    assert set(squad_v2_scores({"c": "Paris"}, records[:2])) == {"exact_match", "f1", "total", "has_answer"}
    assert squad_v2_scores({"c": "Paris"}, records[:2])["exact_match"] == 50.0


def _official_best(preds, scores, na_probs, qid_to_has_ans):
    """evaluate-v2.0.py's `find_best_thresh`, verbatim but for names (scores: raw, x1)."""
    num_no_ans = sum(1 for k in qid_to_has_ans if not qid_to_has_ans[k])
    cur_score = best_score = num_no_ans
    best_thresh = 0.0
    for qid in sorted(na_probs, key=lambda k: na_probs[k]):
        if qid not in scores:
            continue
        diff = scores[qid] if qid_to_has_ans[qid] else (-1 if preds[qid] else 0)
        cur_score += diff
        if cur_score > best_score:
            best_score, best_thresh = cur_score, na_probs[qid]
    return 100.0 * best_score / len(scores), best_thresh


WORDS = ["paris", "rome", "the cat", "cat", "big cat", "oslo"]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(WORDS + [None]), st.sampled_from(WORDS), st.integers(-3, 3)),
                min_size=1, max_size=12))
def test_best_thresholds_are_the_best_threshold(rows):
    """The sweep's scores are the best any threshold gives (abstaining where the odds exceed it),
    its thresholds give them, and with distinct odds they are evaluate-v2.0.py's."""
    records = [QARecord(f"q{i}", "ctx", "q?", () if gold is None else (gold,), () if gold is None else (0,))
               for i, (gold, _, _) in enumerate(rows)]
    answers = {f"q{i}": a for i, (_, a, _) in enumerate(rows)}
    odds = {f"q{i}": float(o) for i, (_, _, o) in enumerate(rows)}
    got = best_thresholds(answers, odds, records)

    def at(t):  # squad_v2_scores of the answers thresholded at t
        return squad_v2_scores({k: "" if odds[k] > t else a for k, a in answers.items()}, records)
    candidates = [math.nextafter(min(odds.values()), -math.inf), *odds.values()]
    for name, key in (("exact", "exact_match"), ("f1", "f1")):
        assert got[f"best_{name}"] == pytest.approx(max(at(t)[key] for t in candidates))
        assert at(got[f"best_{name}_thresh"])[key] == pytest.approx(got[f"best_{name}"])
        if len(set(odds.values())) == len(odds):  # no ties: the official sweep's score
            metric = exact_match if name == "exact" else f1_v2
            raw = {r.id: max(metric(answers[r.id], g) for g in (r.answers or ("",))) for r in records}
            want, _ = _official_best(answers, raw, odds, {r.id: bool(r.answers) for r in records})
            assert got[f"best_{name}"] == pytest.approx(want)


def test_best_thresholds_score_a_record_without_odds_0():
    """A question without a prediction (no window of it fit) scores 0 at every threshold, as in
    squad_v2_scores: here even the unanswerable one, which abstaining would get right."""
    records = [_rec("a", "cat"), QARecord("b", "ctx", "q?", (), ()), QARecord("c", "ctx", "q?", (), ())]
    got = best_thresholds({"a": "cat", "b": "dog"}, {"a": 0.0, "b": 1.0}, records)
    assert got["best_exact"] == pytest.approx(200 / 3) and got["best_exact_thresh"] == 0.0
    assert got["best_exact"] == pytest.approx(squad_v2_scores({"a": "cat", "b": ""}, records)["exact_match"])
    assert best_thresholds({}, {}, records[1:])["best_f1"] == 0.0
    with pytest.raises(ValueError, match="no records"):
        best_thresholds({}, {}, [])


def test_bad_gold_answers_name_the_record():
    """A v1.1 record without a gold answer (an unanswerable v2.0 question) is refused by its id,
    answered or not, rather than failing in `max` or scoring 0; answers given as one string, whose
    characters would be scored as the golds, are refused by every scorer."""
    unanswerable = QARecord("imp", "ctx", "q?", (), ())
    for preds in ({"imp": ""}, {}):
        with pytest.raises(ValueError, match="'imp' has no gold answer.*squad_v2_scores"):
            squad_scores(preds, [_rec("a", "cat"), unanswerable])
    bare = QARecord("s1", "Paris", "q?", "Paris", (0,))  # ("Paris") is no tuple
    for score in (squad_scores, squad_v2_scores, lambda p, r: best_thresholds(p, {"s1": 0.0}, r)):
        with pytest.raises(TypeError, match="record 's1': answers must be a sequence of strings"):
            score({"s1": "P"}, [bare])
