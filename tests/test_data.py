"""SQuAD loading/validation, the prompt, truncation around the answer, fixed-shape batches, resume."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import PreTrainedTokenizerFast

from train.data import (
    SKIP_REASONS,
    DataPosition,
    Encoded,
    PromptTemplate,
    QARecord,
    batches_per_epoch,
    bucket_for,
    bucket_lengths,
    choose_window,
    encode,
    eval_batches,
    format_prompt,
    load_split,
    load_squad_file,
    make_train_batch,
    pack,
    pad_id_of,
    parse_records,
    train_batches,
)
from train.make_assets import train_tokenizer
from train.world import EOS

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


@pytest.fixture(scope="module")
def tok():
    texts = [" ".join(WORDS[i:] + WORDS[:i]) + "." for i in range(len(WORDS))]
    texts += ["CONTEXT\nQUESTION\nANSWER\nWho is Ada? What is it?"] * 3
    return PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(texts, 400), eos_token=EOS, pad_token=EOS)


def rec(id_, context, question, answer, start=None):
    start = context.index(answer) if start is None else start
    return QARecord(id_, context, question, (answer,), (start,))


def squad_doc(*qas_by_context):
    return {"version": "1.1", "data": [{"title": "t", "paragraphs": [
        {"context": c, "qas": qas} for c, qas in qas_by_context]}]}


def qa(id_, question, text, start):
    return {"id": id_, "question": question, "answers": [{"text": text, "answer_start": start}]}


# ----------------------------------------------------------------------------- loading


def test_squad_file_skips_and_counts_malformed(tmp_path):
    ctx = "Ada lives in Paris. Bob lives in Rome."
    doc = squad_doc(
        (ctx, [
            qa("ok", "Where does Ada live?", "Paris", 13),
            qa("fixed", "Where does Bob live?", "Rome", 3),  # wrong start, text elsewhere -> repaired
            qa("lost", "Where?", "Berlin", 0),
            {"id": "none", "question": "Who?", "answers": []},
            qa("blankq", "  ", "Ada", 0),
            qa("ok", "Duplicate id?", "Ada", 0),
            {"id": "typed", "question": 3, "answers": []},
            "not a dict",
        ]),
        ("   ", [qa("noctx", "Why?", "x", 0)]),
    )
    doc["data"].append({"title": "broken", "paragraphs": "nope"})
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(doc))
    res = load_squad_file(path)
    assert [r.id for r in res.records] == ["ok", "fixed"]
    assert res.records[1].answer_starts == (ctx.index("Rome"),)
    assert res.repaired == 1
    assert res.skipped == {"malformed": 3, "empty_context": 1, "empty_question": 1, "no_answer": 1,
                           "answer_not_in_context": 1, "duplicate_id": 1}
    assert set(res.skipped) == set(SKIP_REASONS)


def test_flat_json_and_jsonl_hf_style(tmp_path):
    flat = [{"id": 1, "context": "The sky is blue.", "question": "Colour?",
             "answers": {"text": ["blue", "Blue"], "answer_start": [11, 0]}},
            {"id": "2", "context": "X is 5.", "question": "X?", "answers": [{"text": "5", "answer_start": 5}]}]
    (tmp_path / "flat.json").write_text(json.dumps(flat))
    res = load_squad_file(tmp_path / "flat.json")
    assert res.records[0] == QARecord("1", "The sky is blue.", "Colour?", ("blue",), (11,))
    # "Blue" is not in the text: that answer is dropped (and counted), the record kept
    assert res.num_skipped == 0 and res.dropped_answers == 1
    lines = [json.dumps(r) for r in flat] + ["{broken json"]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    res = load_split(tmp_path, "train")
    assert [r.id for r in res.records] == ["1", "2"] and res.skipped["malformed"] == 1
    (tmp_path / "one.jsonl").write_text(lines[1] + "\n")  # a JSONL file of one record is one JSON object
    assert [r.id for r in load_squad_file(tmp_path / "one.jsonl").records] == ["2"]
    (tmp_path / "latin1.json").write_bytes(json.dumps(flat[1:]).replace("X", "\u00c9").encode("latin-1"))
    with pytest.raises(ValueError, match=f"{tmp_path / 'latin1.json'}: not UTF-8 text"):
        load_squad_file(tmp_path / "latin1.json")


@pytest.mark.parametrize("content, fragment", [
    ("this is not json at all", "not JSON"),
    (json.dumps({"version": "1.1", "articles": []}), "JSON object with keys"),
    (json.dumps([1, 2, 3]), "no SQuAD article or record"),
    (json.dumps(42), "JSON int"),
    (json.dumps({"data": [{"title": "x", "body": "y"}]}), "no SQuAD article or record"),
])
def test_not_squad_shaped_gives_one_clear_error(tmp_path, content, fragment):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=fragment) as err:
        load_squad_file(path)
    assert str(path) in str(err.value) and "paragraphs" in str(err.value)  # names the expected layout


def test_missing_file_and_all_invalid(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        load_split(tmp_path / "nowhere.json", "train")
    with pytest.raises(FileNotFoundError, match="validation.json"):
        load_split(tmp_path, "validation")
    (tmp_path / "dev-v1.1.json").write_text(json.dumps(squad_doc(("ctx", [qa("a", "q", "zzz", 0)]))))
    with pytest.raises(ValueError, match="no valid question-answer record"):
        load_split(tmp_path, "validation")  # found via the dev-v1.1.json alias


def test_squad_v2_unanswerable_questions(tmp_path, tok):
    """SQuAD v2.0: the official layout (version "v2.0", is_impossible, plausible_answers) keeps its
    unanswerable questions with no answers; flat records without an answer are unanswerable only
    in v2.0 data (v2=True), else malformed as in v1.1. Their training target is EOS alone, and an
    over-long context keeps its start."""
    ctx = "Ada lives in Paris."
    doc = squad_doc((ctx, [qa("ok", "Where does Ada live?", "Paris", 13),
                           {"id": "no", "question": "Where does Bob live?", "answers": [], "is_impossible": True,
                            "plausible_answers": [{"text": "Paris", "answer_start": 13}]},
                           {"id": "bad", "question": "Who?", "answers": []}]))
    doc["version"] = "v2.0"
    (tmp_path / "v2.json").write_text(json.dumps(doc))
    res = load_squad_file(tmp_path / "v2.json")
    assert res.v2 and res.unanswerable == 2 and res.num_skipped == 0
    assert [(r.id, r.answers, r.answerable) for r in res.records] == [
        ("ok", ("Paris",), True), ("no", (), False), ("bad", (), False)]
    doc["version"] = "1.1"  # v1.1: "is_impossible" still says so; an answer-less record is malformed
    (tmp_path / "v1.json").write_text(json.dumps(doc))
    res = load_squad_file(tmp_path / "v1.json")
    assert [r.id for r in res.records] == ["ok", "no"] and res.skipped["no_answer"] == 1 and res.v2
    flat = [{"id": "x", "context": ctx, "question": "Who?", "answers": {"text": [], "answer_start": []}}]
    (tmp_path / "flat.json").write_text(json.dumps(flat))
    with pytest.raises(ValueError, match="no valid question-answer record"):
        load_squad_file(tmp_path / "flat.json")
    res = load_split(tmp_path / "flat.json", "train", v2=True)
    assert res.v2 and res.unanswerable == 1 and not parse_records(flat).records

    no = next(r for r in load_squad_file(tmp_path / "v2.json").records if r.id == "no")
    (ex,) = encode(tok, [no], 64, train=True).examples
    assert tok.decode(ex.tokens[ex.target_start:]) == EOS  # the empty answer
    long = QARecord("long", " ".join(WORDS * 3) + ".", "Who is Ada?", (), ())
    (ev,) = encode(tok, [long], 40, train=False).examples
    assert len(ev.tokens) <= 40 and tok.decode(ev.tokens).startswith("CONTEXT\n" + WORDS[0])


_text = st.text(alphabet="ab .", max_size=12)
_answers = st.one_of(
    st.lists(st.fixed_dictionaries({"text": _text, "answer_start": st.integers(-2, 15)}), max_size=3),
    st.fixed_dictionaries({"text": st.lists(_text, max_size=3), "answer_start": st.lists(st.integers(0, 9), max_size=3)}),
    st.none(), st.integers(), st.lists(st.integers(), max_size=2),
)
_record = st.one_of(
    st.fixed_dictionaries({"id": st.one_of(st.sampled_from(["a", "b", "c", ""]), st.integers(0, 3), st.none()),
                           "context": st.one_of(_text, st.none()), "question": st.one_of(_text, st.just(7)),
                           "answers": _answers}),
    st.integers(), st.text(max_size=3), st.none(),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_record, max_size=8))
def test_parser_never_crashes_and_counts_add_up(items):
    res = parse_records(items)
    assert len(res.records) + res.num_skipped == len(items)
    assert len({r.id for r in res.records}) == len(res.records)
    for r in res.records:
        assert r.answers and len(r.answers) == len(r.answer_starts)
        for a, s in zip(r.answers, r.answer_starts):
            assert r.context[s : s + len(a)] == a


# ----------------------------------------------------------------------------- tokenisation


def test_prompt_is_the_seeds_format():
    assert format_prompt("C c.", "Q?") == "CONTEXT\nC c.\n\nQUESTION\nQ?\n\nANSWER\n"


def test_train_encoding_targets_answer_and_eos(tok):
    r = rec("1", "alpha beta gamma delta.", "What is it?", "gamma delta")
    (ex,) = encode(tok, [r], 64, train=True).examples
    assert tok.decode(ex.tokens) == format_prompt(r.context, r.question) + "gamma delta" + EOS
    assert tok.decode(ex.tokens[ex.target_start :]) == "gamma delta" + EOS
    (full,) = encode(tok, [r], 64, train=True, full_sequence_loss=True).examples
    assert full.target_start == 1
    (ev,) = encode(tok, [r], 64, train=False).examples
    assert np.array_equal(ev.tokens, ex.tokens[: ex.target_start])  # eval prompt = train prefix


@pytest.mark.parametrize("template", ["Question: {question}\nContext: {context}\nAnswer{{s}}:",
                                      "{context}\n\n{question}\n"])
def test_prompt_templates(tok, template):
    """Any prompt with {context} and {question} once each, in either order: the prompt (braces
    escaped as in str.format) then the answer + EOS; a cut context keeps its answer; the text after
    the last field is the marker (--alora's invocation)."""
    r = rec("1", "alpha beta gamma delta.", "What is it?", "gamma delta")
    (ex,) = encode(tok, [r], 64, train=True, template=template).examples
    prompt = template.format(context=r.context, question=r.question)
    assert tok.decode(ex.tokens) == prompt + "gamma delta" + EOS and prompt == format_prompt(r.context, r.question,
                                                                                             template)
    assert tok.decode(ex.tokens[ex.target_start:]) == "gamma delta" + EOS
    (ev,) = encode(tok, [r], 64, train=False, template=template).examples
    assert np.array_equal(ev.tokens, ex.tokens[: ex.target_start])
    long = rec("2", " ".join(WORDS * 3) + " the answer.", "Which?", "answer")
    (cut,) = encode(tok, [long], 48, train=True, template=template).examples
    assert len(cut.tokens) <= 48 and cut.truncated and tok.decode(cut.tokens).endswith("answer" + EOS)
    assert PromptTemplate(template).marker == {0: "\nAnswer{s}:", 1: "\n"}[template.startswith("{")]
    assert PromptTemplate().marker == "\n\nANSWER\n" and PromptTemplate("{question}: {context}").marker == ""
    for bad in ("{context} only", "{context} {question} {context}", "{context} {question!r}", "{context} {q} {question}",
                "{{context}} {context} {question}"):
        with pytest.raises(ValueError, match="must hold {context} and {question} once each"):
            PromptTemplate(bad)
    with pytest.raises(ValueError, match="prompt template '{context': expected '}'"):
        PromptTemplate("{context")


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_truncation_keeps_the_answer(tok, where):
    filler = " ".join(WORDS * 3)
    answer = "Ada"
    context = {"start": f"{answer} {filler}.", "middle": f"{filler} {answer} {filler}.",
               "end": f"{filler} {answer}."}[where]
    r = rec("1", context, "Who is Ada?", answer)
    res = encode(tok, [r], 48, train=True)
    (ex,) = res.examples
    assert res.truncated == 1 and ex.truncated and len(ex.tokens) <= 48
    prompt = tok.decode(ex.tokens[: ex.target_start])
    assert answer in prompt.split("\n\nQUESTION")[0]
    (ev,) = encode(tok, [r], 40, train=False).examples
    assert len(ev.tokens) <= 40 and answer in tok.decode(ev.tokens).split("\n\nQUESTION")[0]
    (head,) = encode(tok, [r], 40, train=False, window="start").examples
    assert tok.decode(head.tokens).startswith("CONTEXT\n" + context[:5])


def test_too_long_is_counted_not_fatal(tok):
    r = rec("1", "alpha beta.", " ".join(WORDS * 4) + "?", "beta")
    res = encode(tok, [r], 16, train=True)
    assert res.examples == () and res.skipped == {"too_long": 1}


@pytest.mark.parametrize("n, budget, span, expected", [
    (10, 20, (3, 4), (0, 10)),  # fits: keep all
    (100, 10, (50, 52), (46, 56)),  # centred on the answer
    (100, 10, (1, 2), (0, 10)),  # near the start: shifted inward
    (100, 10, (98, 100), (90, 100)),
    (100, 10, None, (0, 10)),  # no gold: keep the beginning
    (100, 3, (10, 15), None),  # the answer alone does not fit
])
def test_choose_window(n, budget, span, expected):
    assert choose_window(n, budget, span) == expected


# ----------------------------------------------------------------------------- batches


def _records(n):
    out = []
    for i in range(n):
        ctx = " ".join(WORDS[: 2 + (i * 7) % len(WORDS)]) + f" answer{i}."
        out.append(rec(f"r{i}", ctx, f"Question {i}?", f"answer{i}"))
    return out


def test_bucketing_gives_fixed_shapes_and_aligned_labels(tok):
    buckets = bucket_lengths(128, min_len=32)
    assert buckets == (32, 64, 128) and bucket_for(33, buckets) == 64
    assert bucket_lengths(256, 64, step=64) == (64, 128, 192, 256) and bucket_lengths(100, 64) == (64, 100)
    examples = encode(tok, _records(23), 128, train=True).examples
    stream = train_batches(examples, batch_size=4, buckets=buckets, pad_id=pad_id_of(tok), seed=0)
    batches = [next(stream)[1] for _ in range(2 * batches_per_epoch(len(examples), 4))]
    assert {b["input_ids"].shape for b in batches} <= {(4, t) for t in buckets}
    for b in batches:
        assert b["input_ids"].dtype == b["labels"].dtype == b["attention_mask"].dtype == np.int32
        assert b["loss_mask"].dtype == np.float32
        real = b["attention_mask"][:, 1:] == 1
        assert np.array_equal(b["labels"][:, :-1][real], b["input_ids"][:, 1:][real])  # shifted by one
        for i in range(4):
            if b["loss_mask"][i].any():
                target = tok.decode(b["labels"][i][b["loss_mask"][i] == 1])
                assert target.startswith("answer") and target.endswith(EOS)
            else:  # filler row of the last, partial batch: no loss, no fully-masked attention row
                assert b["attention_mask"][i].all()
    assert sum(b["loss_mask"].any(axis=1).sum() for b in batches) == 2 * len(examples)


def test_resume_from_position_yields_the_same_batches(tok):
    examples = encode(tok, _records(10), 128, train=True).examples
    kw = dict(batch_size=3, buckets=bucket_lengths(128), pad_id=pad_id_of(tok), seed=7)
    per_epoch = batches_per_epoch(len(examples), 3)
    stream = train_batches(examples, **kw)
    full = [next(stream) for _ in range(3 * per_epoch)]
    for step in (0, 2, per_epoch, per_epoch + 1, 2 * per_epoch + 3):
        pos = DataPosition.from_step(step, per_epoch)
        assert full[step][0] == pos
        resumed = train_batches(examples, start=pos, **kw)
        for want_pos, want in full[step:]:
            got_pos, got = next(resumed)
            assert got_pos == want_pos
            assert all(np.array_equal(got[k], want[k]) for k in want)
    epoch0, epoch1 = full[:per_epoch], full[per_epoch : 2 * per_epoch]
    assert not all(np.array_equal(a["input_ids"], b["input_ids"]) for (_, a), (_, b) in zip(epoch0, epoch1))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(2, 40), min_size=1, max_size=60), st.integers(40, 64))
def test_pack_places_every_example_once_within_the_row(sizes, row_len):
    examples = [Encoded(f"e{i}", np.arange(n, dtype=np.int32), 1, False) for i, n in enumerate(sizes)]
    rows = pack(examples, row_len)
    assert sorted(e.id for r in rows for e in r.examples) == sorted(e.id for e in examples)
    assert all(0 < r.length <= row_len for r in rows)
    order = {e.id: i for i, e in enumerate(examples)}
    assert all([order[e.id] for e in r.examples] == sorted(order[e.id] for e in r.examples) for r in rows)
    # no two rows could share one: so fewer than twice the rows that all the tokens fill, plus one
    assert all(a.length + b.length > row_len for a in rows for b in rows if a is not b)
    assert len(rows) <= 2 * sum(r.length for r in rows) / row_len + 1
    assert pack(examples, row_len) == rows  # deterministic


def test_packed_batches_hold_each_example_as_its_own_row(tok):
    """A packed batch is the examples' own rows side by side: the same ids, labels and loss targets,
    numbered by segment; train_batches streams the rows as it streams examples."""
    examples = encode(tok, _records(9), 64, train=True).examples
    rows = pack(examples, 128)
    assert len(rows) < len(examples)  # several to a row
    b = make_train_batch(rows[:3], 4, bucket_lengths(128), pad_id_of(tok))
    seg = b["segment_ids"]
    assert np.array_equal(b["attention_mask"], (seg > 0).astype(np.int32)) and not seg[3].any()  # filler row
    for i, row in enumerate(rows[:3]):
        at = 0
        for k, e in enumerate(row.examples, 1):
            alone = make_train_batch([e], 1, (b["input_ids"].shape[1],), pad_id_of(tok))
            n = e.length
            assert (seg[i, at:at + n] == k).all()
            for key in ("input_ids", "labels", "loss_mask"):
                assert np.array_equal(b[key][i, at:at + n], alone[key][0, :n])
            at += n
        assert not seg[i, at:].any() and not b["loss_mask"][i, at:].any()
    stream = train_batches(rows, batch_size=4, buckets=bucket_lengths(128), pad_id=pad_id_of(tok), seed=0)
    served = [next(stream)[1] for _ in range(batches_per_epoch(len(rows), 4))]
    assert sum(int(s["loss_mask"].sum()) for s in served) == sum(e.targets for e in examples)
    assert all((s["segment_ids"].max(axis=1) == [len(r.examples) for r in rows_of(s, rows)]).all() for s in served)
    with pytest.raises(ValueError, match="an example of 41 input tokens does not fit rows of 40"):
        pack([Encoded("long", np.zeros(42, np.int32), 1, False)], 40)


def rows_of(batch, rows):
    """The `pack` rows a packed batch holds (its real rows, by their input ids)."""
    by_ids = {tuple(np.concatenate([e.tokens[:-1] for e in r.examples])): r for r in rows}
    real = batch["segment_ids"].any(axis=1)
    return [by_ids[tuple(ids[seg > 0])] for ids, seg in zip(batch["input_ids"][real], batch["segment_ids"][real])]


def test_eval_batches_left_pad_and_cover_everything(tok):
    examples = encode(tok, _records(7), 128, train=False).examples
    batches = list(eval_batches(examples, batch_size=4, buckets=bucket_lengths(128), pad_id=pad_id_of(tok)))
    ids = [i for b in batches for i, v in zip(b["ids"], b["valid"]) if v]
    assert sorted(ids) == sorted(e.id for e in examples)
    by_id = {e.id: e for e in examples}
    for b in batches:
        T = b["input_ids"].shape[1]
        for row, (id_, valid) in enumerate(zip(b["ids"], b["valid"])):
            if not valid:
                assert id_ == "" and b["attention_mask"][row].tolist() == [0] * (T - 1) + [1]  # one token
                continue
            n = len(by_id[id_].tokens)
            assert b["attention_mask"][row].tolist() == [0] * (T - n) + [1] * n
            assert np.array_equal(b["input_ids"][row, T - n :], by_id[id_].tokens)
            assert b["position_ids"][row, -1] == n - 1 and b["position_ids"][row, T - n] == 0
