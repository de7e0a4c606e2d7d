"""`python -m train.squad --extractive`: run_qa.py's features (question, then context windows), the
span loss against transformers' QA loss, the answers against an exhaustive search over each
record's features, and the job end to end against PEFT's QUESTION_ANS model of its export."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_jax.models import load_tokenizer, question_answering_from_pretrained, save_hf_checkpoint
from lora_jax.models.heads import QA_OUTPUTS
from train import data, extractive, squad

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from test_squad import NAMES, PLACES, _run_subprocess, cli_args, losses, tiny_squad  # noqa: E402

CONTEXT = " ".join(f"{n} lives in {PLACES[i]} and likes {PLACES[(i + 1) % 4]}." for i, n in enumerate(NAMES[:4]))
EX = ["--extractive", "--doc-stride", "4", "--max-answer-length", "4"]  # windows of 26 tokens (ex_args)


def records(v2: bool = False) -> list[data.QARecord]:
    """Questions on one long context (one answer each; v2: the third unanswerable)."""
    out = []
    for i, name in enumerate(NAMES[:4]):
        place = PLACES[i % 4]
        at = CONTEXT.index(f"{name} lives in {place}") + len(f"{name} lives in ")
        gone = v2 and i % 3 == 2
        out.append(data.QARecord(f"q{i}", CONTEXT, f"  Where does {name} live?", () if gone else (place,),
                                 () if gone else (at,)))
    return out


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 60), room=st.integers(1, 30), stride=st.integers(0, 29))
def test_windows_are_the_tokenizers_overflow(n, room, stride):
    """The windows `tokenizer(..., truncation="only_second", stride=, return_overflowing_tokens=True)`
    cuts (the tokenizer on a pair of a one-token first sequence and n tokens, room + 1 at most)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    stride = min(stride, room - 1)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(61)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.enable_truncation(room + 1, stride=stride, strategy="only_second")
    enc = tok.encode("w0", " ".join(f"w{i + 1}" for i in range(n)))
    want = [[i - 1 for i in e.ids[1:]] for e in [enc, *enc.overflowing]]  # each window's context positions
    assert [list(range(lo, hi)) for lo, hi in extractive.windows(n, room, stride)] == want


def test_features_label_the_gold_span(tiny_gpt2_dir):
    """Each feature is the question (leading spaces dropped) and a window of the context; the
    windows cover the context; a window holding the whole first answer is labelled with its
    tokens, any other with 0; a question leaving no more than the stride is skipped and counted."""
    tok = load_tokenizer(tiny_gpt2_dir)
    recs = records(v2=True)
    q_len = max(len(tok(r.question.lstrip())["input_ids"]) for r in recs)
    got = extractive.featurize(tok, recs, max_len=q_len + 12, doc_stride=4)
    assert got.skipped == 0 and got.split_records == len(recs)  # the context needs several windows
    ctx = tok(CONTEXT, add_special_tokens=False)["input_ids"]
    for r in recs:
        feats = [f for f in got.features if f.id == r.id]
        q = tok(r.question.lstrip(), add_special_tokens=False)["input_ids"]  # leading spaces dropped
        covered = set()
        for f in feats:
            assert f.length <= q_len + 12 and list(f.tokens[: f.context_start]) == q
            window = list(f.tokens[f.context_start:])
            lo = next(i for i in range(len(ctx)) if ctx[i: i + len(window)] == window)
            covered |= set(range(lo, lo + len(window)))
            if f.start:  # the span's characters are the answer
                a, b = f.offsets[f.start - f.context_start][0], f.offsets[f.end - f.context_start][1]
                assert r.answerable and r.context[a:b].strip() == r.answers[0]
            else:
                assert f.end == 0
        assert covered == set(range(len(ctx)))
        assert any(f.start for f in feats) == r.answerable  # some window holds each answer whole
    short = extractive.featurize(tok, recs, max_len=q_len + 4, doc_stride=4)
    assert short.skipped >= 1 and len({f.id for f in short.features}) == len(recs) - short.skipped


@pytest.fixture(scope="module")
def qa(tiny_gpt2_dir, tmp_path_factory):
    """(our QA model, params, transformers' GPT2ForQuestionAnswering of the same weights, tokenizer)."""
    model, params = question_answering_from_pretrained(tiny_gpt2_dir, key=jax.random.key(7))
    params[QA_OUTPUTS]["kernel"] *= 20  # sharp, varied spans
    path = save_hf_checkpoint(tmp_path_factory.mktemp("qa"), model.config, params)
    ref = transformers.GPT2ForQuestionAnswering.from_pretrained(path, attn_implementation="eager").eval()
    return model, params, ref, load_tokenizer(tiny_gpt2_dir)


def test_span_loss_is_transformers_loss(qa):
    """A padded batch (with a filler row) gives the mean over its features of transformers' loss on
    each feature alone."""
    model, params, ref, tok = qa
    short, long = (extractive.featurize(tok, records(), max_len=n, doc_stride=8).features for n in (40, 56))
    feats = short[:3] + long[:2]  # two lengths (the model's positions stop at 64)
    assert len({f.length for f in feats}) > 1 and any(f.start for f in feats) and not all(f.start for f in feats)
    batch = extractive.make_batch(feats, 6, (64, 128, 256), pad_id=0)
    total, count = jax.jit(extractive.span_loss(extractive.span_logits(model, None)))(params, None, batch, None)
    want = []
    for f in feats:
        with torch.no_grad():
            out = ref(torch.tensor(f.tokens[None].astype(np.int64)), start_positions=torch.tensor([f.start]),
                      end_positions=torch.tensor([f.end]))
        want.append(float(out.loss))
    assert float(count) == 5
    np.testing.assert_allclose(float(total) / float(count), np.mean(want), rtol=1e-5)


def reference_answers(logits, features, recs, max_answer_len: int, v2: bool, threshold: float = 0.0) -> dict[str, str]:
    """run_qa.py's answers by exhaustive search: `logits(feature) -> (start, end)` numpy [n] each."""
    best, null = {}, {}
    for f in features:
        s, e = logits(f)
        for i in range(f.context_start, f.length):
            for j in range(i, min(i + max_answer_len, f.length)):
                if f.id not in best or s[i] + e[j] > best[f.id][0]:
                    text = recs[f.id].context[f.offsets[i - f.context_start][0]: f.offsets[j - f.context_start][1]]
                    best[f.id] = (s[i] + e[j], text.strip())
        null[f.id] = min(null.get(f.id, np.inf), s[0] + e[0])
    return {k: "" if v2 and null[k] - sc > threshold else t for k, (sc, t) in best.items()}


def test_answers_are_the_best_span_over_the_windows(qa):
    """`predict` (longest first, padded batches, the best over a record's windows) picks the
    exhaustive search's answers; on v2.0, "" wherever the lowest null score wins (by more than the
    threshold)."""
    model, params, _, tok = qa
    recs = records(v2=True)
    feats = extractive.featurize(tok, recs, max_len=40, doc_stride=8).features

    def boosted(p, ids, mask):  # token 0 far ahead in some records' windows (by a question token): null wins
        s, e = model.apply(p, ids, mask)
        return s.at[:, 0].add(jnp.where(ids[:, 11] % 2 == 0, 40.0, 0.0)), e

    by_id = {r.id: r for r in recs}
    nothing = {}
    for apply_fn, v2, threshold in ((model.apply, False, 0.0), (boosted, True, 0.0), (boosted, True, 1e3)):
        got = extractive.predict(apply_fn, params, feats, recs, batch_size=4, buckets=(16, 32, 48), pad_id=0,
                                 max_answer_len=3, v2=v2, null_threshold=threshold)

        def one(f):
            s, e = apply_fn(params, jnp.asarray(f.tokens[None]), jnp.ones((1, f.length), jnp.int32))
            return np.asarray(s[0], np.float64), np.asarray(e[0], np.float64)
        assert got == reference_answers(one, feats, by_id, 3, v2, threshold)
        assert set(got) == set(by_id)
        nothing[v2, threshold] = {k for k, v in got.items() if not v}
    assert nothing[True, 0.0] and len(nothing[True, 0.0]) < len(recs) and not nothing[True, 1e3]


def ex_args(model_dir, squad_file, out, *extra) -> list[str]:
    """`cli_args` for --extractive: no generation flag, --max-len 26 (the tiny tokenizer's questions
    take 16, so contexts of 17 are cut into windows)."""
    args = cli_args(model_dir, squad_file, out, *extra)
    i = args.index("--max-new-tokens")
    del args[i: i + 2]
    args[args.index("--max-len") + 1] = "26"
    return args + EX


def test_extractive_through_the_cli(tiny_gpt2_dir, tmp_path, capsys):
    """Two steps with a validation loss, and a full fine-tuning row; the PEFT export is a
    QUESTION_ANS adapter whose PEFT model gives the job's validation loss and answers; scoring it
    again from that export gives the same answers; flags that belong to generation are refused."""
    peft = pytest.importorskip("peft")
    squad_file = tiny_squad(tmp_path / "squad.json")
    out = tmp_path / "run"
    assert squad.main(ex_args(tiny_gpt2_dir, squad_file, out, "--steps", "2", "--eval-every", "1",
                              "--full-finetune", "--full-lr", "1e-3")) == 0
    printed = capsys.readouterr().out
    assert "extractive: spans from the QA head" in printed
    assert "| LoRA |" in printed and "| full fine-tuning |" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "extractive" and set(summary["scores"]) == {"base", "lora", "full"}
    cfg = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "QUESTION_ANS" and cfg["modules_to_save"] == ["qa_outputs"]

    # PEFT's model of the export: its mean QA loss over the scored features is the last validation
    # loss, and its logits' best spans are the job's answers
    tok = load_tokenizer(tiny_gpt2_dir)
    recs = data.load_split(squad_file, "validation").records[:4]
    feats = extractive.featurize(tok, recs, 26, 4).features
    assert len(feats) > len(recs)  # contexts cut into windows
    base = transformers.GPT2ForQuestionAnswering.from_pretrained(tiny_gpt2_dir)
    ref = peft.PeftModel.from_pretrained(base, out / "peft").eval()

    def one(f):
        with torch.no_grad():
            return ref(torch.tensor(f.tokens[None].astype(np.int64)), start_positions=torch.tensor([f.start]),
                       end_positions=torch.tensor([f.end]))
    val = [r["val_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
           if r["run"] == "lora" and "val_loss" in r]
    assert len(val) == 2
    np.testing.assert_allclose(val[-1], np.mean([float(one(f).loss) for f in feats]), rtol=1e-4)
    answers = json.loads((out / "predictions_lora.json").read_text())

    def logits(f):
        o = one(f)
        return o.start_logits[0].double().numpy(), o.end_logits[0].double().numpy()
    assert answers == reference_answers(logits, feats, {r.id: r for r in recs}, 4, False)

    scored = tmp_path / "scored"
    assert squad.main(ex_args(tiny_gpt2_dir, squad_file, scored, "--eval-only", "--no-base-eval", "--init-adapter",
                              str(out / "peft"))) == 0
    assert json.loads((scored / "predictions_lora.json").read_text()) == answers

    # SQuAD v2.0: run_qa.py's null odds per question, and evaluate-v2.0.py's best threshold, which
    # as --null-score-diff-threshold gives the best F1; an earlier run's files of other models go
    rows = [{"id": f"{k}{i}", "context": f"{n} lives in {PLACES[i % 4]}.", "question": f"{q} does {n} {v}?",
             "answers": {"text": [PLACES[i % 4]] if k == "q" else [], "answer_start": [len(n) + 9] if k == "q" else []}}
            for i, n in enumerate(NAMES) for k, q, v in (("q", "Where", "live"), ("n", "What", "eat"))]
    # the fifth scored question leaves no room for its context in --max-len 26: no feature, scored 0
    rows.insert(4, {"id": "long", "context": "Ana lives in Rome.", "question": "Where " + "in the world " * 9 + "?",
                    "answers": {"text": [], "answer_start": []}})
    v2 = tmp_path / "v2.jsonl"
    v2.write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "v2run").mkdir()
    (tmp_path / "v2run" / "predictions_full.json").write_text("{}")
    runs = {}
    for name, extra in (("one", ("--null-score-diff-threshold", "1")), ("best", None)):
        extra = extra or ("--null-score-diff-threshold", repr(runs["one"][0]["best_f1_thresh"]))
        assert squad.main(ex_args(tiny_gpt2_dir, v2, tmp_path / "v2run", "--eval-only", "--no-base-eval",
                                  "--init-adapter", str(out / "peft"), "--version-2-with-negative", "--eval-samples",
                                  "5", *extra)) == 0
        s = json.loads((tmp_path / "v2run" / "summary.json").read_text())["scores"]["lora"]
        odds = json.loads((tmp_path / "v2run" / "null_odds_lora.json").read_text())
        preds = json.loads((tmp_path / "v2run" / "predictions_lora.json").read_text())
        runs[name] = (s, odds, preds)
    printed = capsys.readouterr().out
    assert "| best EM | at --null-score-diff-threshold | best F1 |" in printed
    assert "removed 1 file(s) of an earlier run" in printed
    assert "validation: 1 of 5 questions do not fit --max-len 26; they score 0" in printed
    assert not (tmp_path / "v2run" / "predictions_full.json").exists()
    (one, odds, spans), (best, _, preds) = runs["one"], runs["best"]
    assert len(odds) == 4 and max(odds.values()) < 1  # threshold 1: every best span is the answer
    assert one["total"] == 5 and "long" not in preds
    assert preds == {k: t if odds[k] <= one["best_f1_thresh"] else "" for k, t in spans.items()}
    assert best["f1"] == pytest.approx(one["best_f1"]) and one["best_f1"] > one["f1"]  # the threshold mattered here

    # a generation adapter has no head to train; a QA adapter generates nothing
    assert squad.main(cli_args(tiny_gpt2_dir, squad_file, tmp_path / "gen", "--steps", "1")) == 0
    capsys.readouterr()
    assert squad.main(ex_args(tiny_gpt2_dir, squad_file, tmp_path / "x", "--eval-only", "--init-adapter",
                              str(tmp_path / "gen" / "peft"))) == 1
    assert "leaves it out" in capsys.readouterr().err
    for fmt in ("peft", "adapter"):  # the causal LM has no qa_outputs to load it into
        assert squad.main(cli_args(tiny_gpt2_dir, squad_file, tmp_path / "x", "--eval-only", "--init-adapter",
                                   str(out / fmt))) == 1
        assert "'qa_outputs/bias'" in capsys.readouterr().err
    for bad in (["--alora"], ["--num-beams", "2"], ["--max-new-tokens", "4"], ["--packing"]):
        with pytest.raises(SystemExit):
            squad.main(["--extractive", *bad, "--output-dir", str(tmp_path / "x")])
        assert "--extractive picks spans" in capsys.readouterr().err
    for flag, value in (("--doc-stride", "8"), ("--max-answer-length", "5"), ("--null-score-diff-threshold", "1")):
        with pytest.raises(SystemExit):
            squad.main([flag, value, "--output-dir", str(tmp_path / "x")])
        assert f"{flag} belongs to --extractive's span reading: pass --extractive with it" in capsys.readouterr().err


@pytest.mark.parametrize("parallel", ["pmap", "fsdp"])
def test_extractive_data_parallel_matches_one_device(tiny_gpt2_dir, tmp_path, parallel):
    """Span batches over 4 devices (pmap, fsdp): one device's losses, validation losses and answers."""
    squad_file = tiny_squad(tmp_path / "squad.json")
    extra = ("--steps", "3", "--no-base-eval", "--eval-every", "2")
    assert squad.main(ex_args(tiny_gpt2_dir, squad_file, tmp_path / "one", *extra)) == 0
    _run_subprocess(ex_args(tiny_gpt2_dir, squad_file, tmp_path / parallel, *extra, "--parallel", parallel),
                    devices=4)
    for key, n in (("loss", 3), ("val_loss", 2)):
        assert len(losses(tmp_path / "one", key=key)) == n
        np.testing.assert_allclose(losses(tmp_path / parallel, key=key), losses(tmp_path / "one", key=key), rtol=1e-5)
    assert json.loads((tmp_path / parallel / "predictions_lora.json").read_text()) == \
        json.loads((tmp_path / "one" / "predictions_lora.json").read_text())
