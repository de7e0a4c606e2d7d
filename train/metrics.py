"""The official SQuAD evaluations (exact match and token F1): v1.1 as in `evaluate-v1.1.py`, v2.0
as in `evaluate-v2.0.py`.

Normalise: lowercase, drop every `string.punctuation` character, replace the articles
a/an/the with a space, collapse whitespace. EM is normalised equality; F1 is the bag-of-tokens
overlap (0 when nothing overlaps). Each prediction scores the max over its gold answers; the
dataset score is the mean x 100. v2.0 drops gold answers that normalise to nothing; a question
left without one (unanswerable) has the empty answer as its only gold, and an empty prediction
or gold gets F1 1 if both are empty, else 0. It reports the questions with and without an answer
apart too (HasAns / NoAns).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Any, Iterable, Mapping, Protocol, Sequence

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


class HasAnswers(Protocol):
    """Anything with an `id` and gold `answers` (e.g. `train.data.QARecord`)."""

    id: str
    answers: Sequence[str]


def _golds(rec: HasAnswers) -> Sequence[str]:
    """`rec.answers`, refusing a bare string: its characters would be scored as the gold answers."""
    if isinstance(rec.answers, str):
        raise TypeError(f"record {rec.id!r}: answers must be a sequence of strings, got the string {rec.answers!r}")
    return rec.answers


def normalize_answer(s: str) -> str:
    """Lowercase, strip punctuation and articles, collapse whitespace (official order)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, ground_truth: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def f1(prediction: str, ground_truth: str) -> float:
    """Token-level F1 of the normalised strings; 0.0 when no token overlaps."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(ground_truth).split()
    common = Counter(pred_tokens) & Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def max_over_ground_truths(metric, prediction: str, ground_truths: Iterable[str]) -> float:
    """The best score of `prediction` against any gold answer (official per-question rule)."""
    return max(metric(prediction, gt) for gt in ground_truths)


def squad_scores(predictions: Mapping[str, str], records: Iterable[HasAnswers]) -> dict[str, float]:
    """Average EM and F1 (x100) of `predictions` (id -> text) over `records`.

    As in the official script, a record without a prediction scores 0 on both metrics;
    predictions whose id is not among `records` are ignored.

    Returns:
        `{"exact_match": float, "f1": float}`, both in [0, 100]; zeros for no records.

    Raises:
        ValueError: a record without a gold answer (v1.1 has none; v2.0's go to `squad_v2_scores`).
    """
    em_total = f1_total = 0.0
    n = 0
    for rec in records:
        n += 1
        if not _golds(rec):
            raise ValueError(f"squad_scores: record {rec.id!r} has no gold answer; an unanswerable SQuAD v2.0 "
                             "question is scored by squad_v2_scores")
        if rec.id not in predictions:
            continue
        pred = predictions[rec.id]
        em_total += max_over_ground_truths(exact_match, pred, rec.answers)
        f1_total += max_over_ground_truths(f1, pred, rec.answers)
    if n == 0:
        return {"exact_match": 0.0, "f1": 0.0}
    return {"exact_match": 100.0 * em_total / n, "f1": 100.0 * f1_total / n}


def f1_v2(prediction: str, ground_truth: str) -> float:
    """evaluate-v2.0.py's `compute_f1`: as `f1`, but 1.0 when both normalise to nothing."""
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(ground_truth).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    return f1(prediction, ground_truth)


def squad_v2_scores(predictions: Mapping[str, str], records: Iterable[HasAnswers]) -> dict[str, Any]:
    """SQuAD v2.0 EM and F1 (x100) of `predictions` over `records`, and the same over the records
    with an answer (`has_answer`) and without (`no_answer`), each with its `total`.

    evaluate-v2.0.py with its default no-answer threshold; a record without a prediction scores 0
    (the official script skips it in the overall mean and fails on it in the HasAns / NoAns ones).
    """
    scored: dict[str, list[tuple[float, float]]] = {"has_answer": [], "no_answer": []}
    for rec in records:
        golds = [a for a in _golds(rec) if normalize_answer(a)] or [""]
        pred = predictions.get(rec.id)
        em = 0.0 if pred is None else max(exact_match(pred, g) for g in golds)
        f = 0.0 if pred is None else max(f1_v2(pred, g) for g in golds)
        scored["has_answer" if rec.answers else "no_answer"].append((em, f))

    def mean(rows: list[tuple[float, float]]) -> dict[str, Any]:
        n = len(rows)
        return {"exact_match": 100.0 * sum(e for e, _ in rows) / n if n else 0.0,
                "f1": 100.0 * sum(f for _, f in rows) / n if n else 0.0, "total": n}

    return {**mean(scored["has_answer"] + scored["no_answer"]),
            **{part: mean(rows) for part, rows in scored.items() if rows}}


def best_thresholds(answers: Mapping[str, str], null_odds: Mapping[str, float],
                    records: Iterable[HasAnswers]) -> dict[str, float]:
    """evaluate-v2.0.py's `find_all_best_thresh` (its `--na-prob-file` sweep): the best EM and F1
    (x100) that abstaining wherever a record's `null_odds` exceed a threshold can give, and the
    threshold, over `answers` = what each record says when it does not abstain (its best span).

    A record is answered where its odds are at most the threshold, abstains ("") above it, as
    `extractive.predict`'s `null_threshold` decides (odds = null score - best span score), so
    `best_f1_thresh` is the `--null-score-diff-threshold` that scores `best_f1`. The sweep steps over
    whole runs of equal odds (the official one may stop inside one, which no threshold realises) and
    credits an answer to an unanswerable question with its own score, not -1 (they differ only for
    an answer that normalises to nothing); with nothing worth answering, the threshold is just
    below the lowest odds. A record without an answer or odds (no prediction) scores 0 at every
    threshold, as in `squad_v2_scores`.
    """
    records = list(records)
    if not records:
        raise ValueError("best_thresholds: no records to score")
    out: dict[str, float] = {}
    for name, metric in (("exact", exact_match), ("f1", f1_v2)):
        total = 0.0  # abstaining everywhere: the unanswerable questions score 1 each
        gains = []  # what answering a record instead of abstaining adds
        for r in records:
            if r.id not in answers or r.id not in null_odds:
                continue
            golds = [a for a in _golds(r) if normalize_answer(a)] or [""]
            score = max(metric(answers[r.id], g) for g in golds)
            skip = 0.0 if golds != [""] else 1.0
            total += skip
            gains.append((float(null_odds[r.id]), score - skip))
        gains.sort(key=lambda x: x[0])
        best, thresh = total, math.nextafter(gains[0][0], -math.inf) if gains else 0.0
        for i, (odds, gain) in enumerate(gains):
            total += gain
            if (i + 1 == len(gains) or gains[i + 1][0] != odds) and total > best:
                best, thresh = total, odds
        out[f"best_{name}"], out[f"best_{name}_thresh"] = 100.0 * best / len(records), thresh
    return out
