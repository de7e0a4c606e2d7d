"""Extractive QA and token classification: our GPT-2 / BLOOM with HF's `qa_outputs` / `classifier`
heads equal transformers' `*ForQuestionAnswering` / `*ForTokenClassification`; new heads on a
causal LM checkpoint; LoRA + a trained head as PEFT's QUESTION_ANS / TOKEN_CLS tasks, both ways;
the best-span search."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from lora_jax import checkpoint
from lora_jax import peft as lp
from lora_jax.models import (best_spans, classifier_from_pretrained, from_pretrained,
                             question_answering_from_pretrained, save_hf_checkpoint,
                             token_classifier_from_pretrained)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from conftest import _randomize  # noqa: E402

NUM_LABELS = 5
TASKS = {"qa": ("ForQuestionAnswering", "AutoModelForQuestionAnswering", question_answering_from_pretrained,
                "qa_outputs", "QUESTION_ANS"),
         "token": ("ForTokenClassification", "AutoModelForTokenClassification", token_classifier_from_pretrained,
                   "classifier", "TOKEN_CLS")}


def _ids(pad: int, seed: int = 0):
    """[3, 10] right-padded rows of 10, 7 and 3 real tokens, and their mask."""
    ids = np.random.default_rng(seed).integers(5, 320, (3, 10))
    mask = np.ones_like(ids)
    mask[1, 7:], mask[2, 3:] = 0, 0
    return np.where(mask == 1, ids, pad), mask


@pytest.fixture(scope="module")
def head_dirs(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """{(task, arch): a transformers checkpoint of that head, randomised}."""
    out = {}
    for arch in ("gpt2", "bloom"):
        config = (transformers.GPT2Config(vocab_size=320, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                          num_labels=NUM_LABELS, pad_token_id=0, classifier_dropout=0.2)
                  if arch == "gpt2" else
                  transformers.BloomConfig(vocab_size=320, hidden_size=48, n_layer=2, n_head=6, num_labels=NUM_LABELS,
                                           pad_token_id=3))
        for task, (suffix, *_rest) in TASKS.items():
            model = getattr(transformers, ("GPT2" if arch == "gpt2" else "Bloom") + suffix)(config)
            _randomize(model.eval())
            out[task, arch] = tmp_path_factory.mktemp(f"{task}_{arch}")
            model.save_pretrained(out[task, arch])
    return out


def _torch_out(model, task: str, ids, mask) -> np.ndarray:
    """transformers' outputs as ours: [B, T, 2] (start, end) for QA, [B, T, N] logits for tagging."""
    with torch.no_grad():
        out = model(torch.tensor(ids), attention_mask=torch.tensor(mask))
    if task == "qa":
        return np.stack([out.start_logits.float().numpy(), out.end_logits.float().numpy()], axis=-1)
    return out.logits.float().numpy()


def _ours(apply, task: str, *args) -> np.ndarray:
    out = apply(*args)
    return np.stack([np.asarray(out[0]), np.asarray(out[1])], axis=-1) if task == "qa" else np.asarray(out)


@pytest.mark.parametrize("arch", ["gpt2", "bloom"])
@pytest.mark.parametrize("task", ["qa", "token"])
def test_heads_match_transformers(head_dirs, task, arch):
    _suffix, auto, load, head, _ = TASKS[task]
    ref = getattr(transformers, auto).from_pretrained(head_dirs[task, arch], attn_implementation="eager").eval()
    model, params = load(head_dirs[task, arch])
    outputs = 2 if task == "qa" else NUM_LABELS
    assert params[head]["kernel"].shape == (model.config.hidden_size, outputs) and params[head]["bias"].shape == (
        outputs,)
    ids, mask = _ids(model.config.pad_token_id)
    want, real = _torch_out(ref, task, ids, mask), mask.astype(bool)
    np.testing.assert_allclose(_ours(jax.jit(model.apply), task, params, ids, mask)[real], want[real], atol=2e-5)
    if arch == "bloom":  # scanned layers, one architecture (a compile each)
        scanned, sparams = load(head_dirs[task, arch], scan_layers=True)
        np.testing.assert_allclose(_ours(scanned.apply, task, sparams, ids, mask)[real], want[real], atol=2e-5)


def test_new_heads_on_a_causal_lm_checkpoint(tiny_gpt2_dir, head_dirs, tmp_path):
    """A causal LM checkpoint gets new heads drawn as transformers draws a Linear (N(0, 0.02), bias
    0); the export is a checkpoint transformers loads with that architecture; a checkpoint of another
    head, or of other labels, is refused by name."""
    _, body = from_pretrained(tiny_gpt2_dir)
    ids, mask = _ids(pad=0)
    real = mask.astype(bool)
    for task, (suffix, auto, load, head, _) in TASKS.items():
        model, params = load(tiny_gpt2_dir, key=jax.random.key(1), **({"num_labels": 4} if task == "token" else {}))
        for x, y in zip(jax.tree.leaves(body), jax.tree.leaves(params["transformer"])):
            np.testing.assert_array_equal(x, y)
        kernel = np.asarray(params[head]["kernel"])
        assert kernel.shape == (32, 2 if task == "qa" else 4) and 0.01 < kernel.std() < 0.03
        assert not np.asarray(params[head]["bias"]).any()
        save_hf_checkpoint(tmp_path / task, model.config, params)
        hf = json.loads((tmp_path / task / "config.json").read_text())
        assert hf["architectures"] == ["GPT2" + suffix]
        theirs = getattr(transformers, auto).from_pretrained(tmp_path / task, attn_implementation="eager").eval()
        np.testing.assert_allclose(_ours(model.apply, task, params, ids, mask)[real],
                                   _torch_out(theirs, task, ids, mask)[real], atol=2e-5)
    assert token_classifier_from_pretrained(tiny_gpt2_dir)[0].num_labels == 2  # the config's id2label, as HF
    with pytest.raises(ValueError, match=r"classifier.weight \(5, 32\) holds 5 labels, not num_labels=3"):
        token_classifier_from_pretrained(head_dirs["token", "gpt2"], num_labels=3)
    with pytest.raises(ValueError, match="is a question-answering model .* question_answering_from_pretrained"):
        from_pretrained(head_dirs["qa", "gpt2"])
    with pytest.raises(ValueError, match="is a token classifier .* token_classifier_from_pretrained"):
        classifier_from_pretrained(head_dirs["token", "gpt2"])


def test_token_classifier_dropout(head_dirs):
    """The head's dropout is transformers' choice (classifier_dropout, else hidden_dropout, else 0.1),
    in training only: about that share of the hidden features are zeroed before the head."""
    tagger, params = token_classifier_from_pretrained(head_dirs["token", "gpt2"])
    assert tagger.dropout_rate == 0.2
    bloom = token_classifier_from_pretrained(head_dirs["token", "bloom"])[0]
    assert bloom.dropout_rate == 0.0  # hidden_dropout
    # the config's field, as exported (transformers builds the head's dropout from the export)
    assert bloom.__class__(bloom.config.replace(hidden_dropout=0.3), NUM_LABELS).dropout_rate == 0.3
    ids, mask = _ids(0)
    params = {**params, "classifier": {"kernel": jnp.eye(32, NUM_LABELS), "bias": jnp.zeros(NUM_LABELS)}}
    quiet = tagger.config.hf_config | {"resid_pdrop": 0.0, "embd_pdrop": 0.0}
    still = tagger.__class__(tagger.config.replace(resid_pdrop=0.0, embd_pdrop=0.0, hf_config=quiet), NUM_LABELS)
    clean = np.asarray(still.apply(params, ids, mask))
    dropped = np.asarray(still.apply(params, ids, mask, deterministic=False, rng=jax.random.key(0)))
    zeroed = np.isclose(dropped, 0) & ~np.isclose(clean, 0)
    assert 0.1 < zeroed.mean() < 0.3
    np.testing.assert_allclose(dropped[~zeroed], clean[~zeroed] / 0.8, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("task, arch, target", [("qa", "gpt2", "c_attn"), ("token", "bloom", "query_key_value")])
def test_lora_heads_are_peft_tasks_both_ways(head_dirs, tmp_path, task, arch, target, nudge_torch, jax_train):
    """LoRA on the fused QKV + the head trained in full (PEFT's QUESTION_ANS / TOKEN_CLS): trained
    here, exported, loaded by PEFT on transformers' model (same outputs), read back, merged; and an
    adapter PEFT made for the task runs here with PEFT's outputs."""
    import peft

    _suffix, auto, load, head, task_type = TASKS[task]
    model, params = load(head_dirs[task, arch])
    config = lj.LoraConfig(rank=4, alpha=8, targets=[target], trainable=head)
    adapters = lj.init(config, params, jax.random.key(0))
    ids, mask = _ids(model.config.pad_token_id)
    real = mask.astype(bool)
    g = lj.apply(model.apply, config)
    if task == "qa":  # transformers' QA loss: cross-entropy of the start and of the end position, averaged
        batch = {"ids": ids, "mask": mask, "start": np.array([2, 1, 0]), "end": np.array([4, 5, 1])}

        def loss(p, a, b):
            start, end = g(p, a, b["ids"], b["mask"])
            return (optax.softmax_cross_entropy_with_integer_labels(start, b["start"]).mean()
                    + optax.softmax_cross_entropy_with_integer_labels(end, b["end"]).mean()) / 2
    else:
        batch = {"ids": ids, "mask": mask, "labels": np.arange(30).reshape(3, 10) % NUM_LABELS}

        def loss(p, a, b):
            xent = optax.softmax_cross_entropy_with_integer_labels(g(p, a, b["ids"], b["mask"]), b["labels"])
            return (xent * b["mask"]).sum() / b["mask"].sum()
    trainable, frozen, first, last = jax_train(loss, optax.adam(3e-2), config, params, adapters, batch, 5)
    assert last < 0.7 * first
    tuned, adapters = lj.join(trainable, frozen)
    assert not np.array_equal(tuned[head]["kernel"], params[head]["kernel"])
    ours = _ours(g, task, tuned, adapters, ids, mask)

    lp.save_peft(tmp_path / "peft", config, adapters, model_config=model.config, params=tuned)
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert saved["task_type"] == task_type and saved["modules_to_save"] == [head]
    base = lambda: getattr(transformers, auto).from_pretrained(head_dirs[task, arch],  # noqa: E731
                                                               attn_implementation="eager")
    pm = peft.PeftModel.from_pretrained(base(), str(tmp_path / "peft")).eval()
    np.testing.assert_allclose(_torch_out(pm, task, ids, mask)[real], ours[real], atol=5e-5)

    back = lp.load_peft(tmp_path / "peft", params, model_config=model.config)
    assert set(back.extras) == {f"{head}/kernel", f"{head}/bias"}
    restored = checkpoint.update_params(params, back.extras)
    np.testing.assert_allclose(_ours(lj.apply(model.apply, back.config), task, restored, back.adapters, ids, mask),
                               ours, atol=1e-5)

    lp.save_merged(tmp_path / "merged", model.config, tuned, config, adapters)
    merged = getattr(transformers, auto).from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
    np.testing.assert_allclose(_torch_out(merged, task, ids, mask)[real], ours[real], atol=5e-5)

    theirs = nudge_torch(peft.get_peft_model(base(), peft.LoraConfig(task_type=task_type, r=2, lora_alpha=4,
                                                                     target_modules=[target])), 1)
    theirs.save_pretrained(tmp_path / "theirs")
    assert head in json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())["modules_to_save"]
    got = lp.load_peft(tmp_path / "theirs", params, model_config=model.config)
    assert set(got.extras) == {f"{head}/kernel", f"{head}/bias"}
    mine = _ours(lj.apply(model.apply, got.config), task, checkpoint.update_params(params, got.extras),
                 got.adapters, ids, mask)
    np.testing.assert_allclose(mine[real], _torch_out(theirs, task, ids, mask)[real], atol=5e-5)


def test_best_spans_is_the_best_allowed_span():
    """The highest start + end logit over start <= end < start + max_answer_len on allowed tokens,
    against a search over every pair; jitted; a row with nothing allowed scores -inf."""
    rng = np.random.default_rng(0)
    start, end = rng.normal(size=(6, 12)), rng.normal(size=(6, 12))
    allowed = rng.random((6, 12)) < 0.6
    allowed[5] = False
    for max_len in (1, 3, 12):
        spans, scores = jax.jit(best_spans, static_argnames="max_answer_len")(start, end, allowed,
                                                                              max_answer_len=max_len)
        for b in range(6):
            pairs = [(start[b, i] + end[b, j], i, j) for i in range(12) for j in range(i, min(12, i + max_len))
                     if allowed[b, i] and allowed[b, j]]
            if not pairs:
                assert scores[b] == -np.inf
                continue
            best = max(pairs)
            assert tuple(np.asarray(spans[b])) == best[1:] and scores[b] == pytest.approx(best[0], rel=1e-6)
    spans, _ = best_spans(start, end, max_answer_len=30)  # no mask: every token
    assert (spans[:, 0] <= spans[:, 1]).all()
    with pytest.raises(ValueError, match="max_answer_len must be a positive integer, got 0"):
        best_spans(start, end, max_answer_len=0)
    with pytest.raises(ValueError, match=r"best_spans wants \[B, T\] arrays of one shape, got .*'allowed': \(6, 11\)"):
        best_spans(start, end, allowed[:, 1:])
