"""Sequence classification: our GPT-2 / BLOOM with HF's `score` head equal transformers'
`*ForSequenceClassification`; a new head on a causal LM checkpoint; LoRA + a trained head as
PEFT's SEQ_CLS task, both ways, and the merged export."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

import lora_jax as lj
from lora_jax import checkpoint
from lora_jax import peft as lp
from lora_jax.models import classifier_from_pretrained, from_pretrained, save_hf_checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from conftest import _randomize  # noqa: E402

NUM_LABELS = 3


def _ids(pad: int, seed: int = 0):
    """[4, 10] right-padded rows (HF's default for classification) of 10, 7, 3 and 10 real tokens."""
    ids = np.random.default_rng(seed).integers(5, 320, (4, 10))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    return np.where(mask == 1, ids, pad), mask


@pytest.fixture(scope="module")
def clf_dirs(tmp_path_factory) -> dict[str, Path]:
    from transformers import BloomConfig, BloomForSequenceClassification, GPT2Config, GPT2ForSequenceClassification

    made = {"gpt2": GPT2ForSequenceClassification(GPT2Config(
                vocab_size=320, n_positions=64, n_embd=32, n_layer=2, n_head=4, num_labels=NUM_LABELS,
                pad_token_id=0)),
            "bloom": BloomForSequenceClassification(BloomConfig(
                vocab_size=320, hidden_size=48, n_layer=2, n_head=6, num_labels=NUM_LABELS, pad_token_id=3))}
    out = {}
    for name, model in made.items():
        _randomize(model.eval())
        out[name] = tmp_path_factory.mktemp(f"clf_{name}")
        model.save_pretrained(out[name])
    return out


def _torch_logits(model, ids, mask) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.float().numpy()


@pytest.mark.parametrize("arch", ["gpt2", "bloom"])
def test_logits_match_transformers(clf_dirs, arch):
    from transformers import AutoModelForSequenceClassification

    ref_model = AutoModelForSequenceClassification.from_pretrained(clf_dirs[arch], attn_implementation="eager")
    clf, params = classifier_from_pretrained(clf_dirs[arch])
    assert clf.num_labels == NUM_LABELS and params["score"]["kernel"].shape == (clf.config.hidden_size, NUM_LABELS)
    ids, mask = _ids(clf.config.pad_token_id)
    want = _torch_logits(ref_model, ids, mask)
    np.testing.assert_allclose(clf.apply(params, ids, mask), want, atol=2e-5)
    # without a mask the last token that is not the pad id is pooled, as transformers does
    np.testing.assert_allclose(clf.apply(params, ids), want, atol=2e-5)
    scanned, sparams = classifier_from_pretrained(clf_dirs[arch], scan_layers=True)
    np.testing.assert_allclose(scanned.apply(sparams, ids, mask), want, atol=2e-5)


def test_new_head_on_a_causal_lm_checkpoint(tiny_gpt2_dir, clf_dirs, tmp_path):
    """A causal LM checkpoint gets a new N(0, 0.02) head (AutoModelForSequenceClassification's
    num_labels=); the export is a checkpoint transformers loads as a classifier; mismatches fail."""
    from transformers import AutoModelForSequenceClassification

    clf, params = classifier_from_pretrained(tiny_gpt2_dir, num_labels=4, key=jax.random.key(1))
    _, body = from_pretrained(tiny_gpt2_dir)
    for x, y in zip(jax.tree.leaves(body), jax.tree.leaves(params["transformer"])):
        np.testing.assert_array_equal(x, y)
    head = np.asarray(params["score"]["kernel"])
    assert head.shape == (32, 4) and 0.015 < head.std() < 0.025
    np.testing.assert_array_equal(head, classifier_from_pretrained(tiny_gpt2_dir, num_labels=4,
                                                                   key=jax.random.key(1))[1]["score"]["kernel"])
    assert classifier_from_pretrained(tiny_gpt2_dir)[0].num_labels == 2  # the config's id2label, as HF

    save_hf_checkpoint(tmp_path / "clf", clf.config, params)
    hf = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert hf["architectures"] == ["GPT2ForSequenceClassification"] and len(hf["id2label"]) == 4
    theirs = AutoModelForSequenceClassification.from_pretrained(tmp_path / "clf", attn_implementation="eager")
    ids, mask = _ids(pad=0)
    theirs.config.pad_token_id = 0
    np.testing.assert_allclose(clf.apply(params, ids, mask), _torch_logits(theirs, ids, mask), atol=2e-5)

    with pytest.raises(ValueError, match=r"score.weight \(3, 32\) holds 3 labels, not num_labels=5"):
        classifier_from_pretrained(clf_dirs["gpt2"], num_labels=5)
    with pytest.raises(ValueError, match="is a sequence classifier .* classifier_from_pretrained"):
        from_pretrained(clf_dirs["gpt2"])
    with pytest.raises(ValueError, match="num_labels must be a positive integer, got True"):
        classifier_from_pretrained(tiny_gpt2_dir, num_labels=True)  # a bool is no label count


def _xent(clf, config):
    g = lj.apply(clf.apply, config)

    def loss(params, adapters, batch):
        logits = g(params, adapters, batch["ids"], batch["mask"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
    return g, loss


@pytest.mark.parametrize("arch, target", [("gpt2", "c_attn"), ("bloom", "query_key_value")])
def test_lora_classifier_is_peft_seq_cls_both_ways(clf_dirs, tmp_path, arch, target, nudge_torch, jax_train):
    """LoRA on the fused QKV + the head trained in full (PEFT's SEQ_CLS): trained here, exported,
    loaded by PEFT on transformers' classifier (same logits), read back, merged; and an adapter
    PEFT made for SEQ_CLS runs here with PEFT's logits."""
    import peft
    from transformers import AutoModelForSequenceClassification

    clf, params = classifier_from_pretrained(clf_dirs[arch])
    config = lj.LoraConfig(rank=4, alpha=8, targets=[target], trainable="score")
    adapters = lj.init(config, params, jax.random.key(0))
    ids, mask = _ids(clf.config.pad_token_id)
    batch = {"ids": ids, "mask": mask, "labels": np.array([0, 1, 2, 1])}
    g, loss = _xent(clf, config)
    trainable, frozen, first, last = jax_train(loss, optax.adam(3e-2), config, params, adapters, batch, 5)
    assert last < 0.5 * first
    tuned, adapters = lj.join(trainable, frozen)
    assert not np.array_equal(tuned["score"]["kernel"], params["score"]["kernel"])
    ours = np.asarray(g(tuned, adapters, ids, mask))

    lp.save_peft(tmp_path / "peft", config, adapters, model_config=clf.config, params=tuned)
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS" and saved["modules_to_save"] == ["score"]
    lora_only = lj.LoraConfig(rank=4, alpha=8, targets=[target])  # no params: say the task
    assert lp.peft_config_dict(lora_only, adapters, model_config=clf.config)["task_type"] == "CAUSAL_LM"
    assert lp.peft_config_dict(lora_only, adapters, model_config=clf.config, task_type="SEQ_CLS")["task_type"] == \
        "SEQ_CLS"
    with pytest.raises(ValueError, match="task_type must be one of"):
        lp.peft_config_dict(lora_only, adapters, model_config=clf.config, task_type="FEATURE_EXTRACTION")
    base = AutoModelForSequenceClassification.from_pretrained(clf_dirs[arch], attn_implementation="eager")
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    np.testing.assert_allclose(_torch_logits(pm, ids, mask), ours, atol=5e-5)

    back = lp.load_peft(tmp_path / "peft", params, model_config=clf.config)
    assert set(back.extras) == {"score/kernel"}
    restored = checkpoint.update_params(params, back.extras)
    np.testing.assert_allclose(lj.apply(clf.apply, back.config)(restored, back.adapters, ids, mask), ours, atol=1e-5)

    lp.save_merged(tmp_path / "merged", clf.config, tuned, config, adapters)
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", attn_implementation="eager")
    np.testing.assert_allclose(_torch_logits(merged, ids, mask), ours, atol=5e-5)

    # PEFT's own SEQ_CLS adapter (PEFT adds `score` to modules_to_save itself)
    theirs = peft.get_peft_model(
        AutoModelForSequenceClassification.from_pretrained(clf_dirs[arch], attn_implementation="eager"),
        peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=[target]))
    nudge_torch(theirs, 1)
    theirs.save_pretrained(tmp_path / "theirs")
    got = lp.load_peft(tmp_path / "theirs", params, model_config=clf.config)
    assert "score/kernel" in got.extras
    mine = lj.apply(clf.apply, got.config)(checkpoint.update_params(params, got.extras), got.adapters, ids, mask)
    np.testing.assert_allclose(mine, _torch_logits(theirs, ids, mask), atol=5e-5)


def test_all_linear_leaves_the_head_out_as_peft_does(clf_dirs):
    """"all-linear" on a classifier targets what PEFT's SEQ_CLS model targets (every linear layer but
    `score`, which trains in full), and quantizing "all-linear" keeps the head dense."""
    import peft
    from transformers import AutoModelForSequenceClassification

    from lora_jax import quant

    clf, params = classifier_from_pretrained(clf_dirs["gpt2"])
    theirs = peft.get_peft_model(AutoModelForSequenceClassification.from_pretrained(clf_dirs["gpt2"]),
                                 peft.LoraConfig(task_type="SEQ_CLS", target_modules="all-linear", r=2))
    ours = lj.target_paths(lj.LoraConfig(rank=2, targets="all-linear"), params)
    assert sorted(p.rsplit("/", 1)[0].replace("/", ".") for p in ours) == sorted(
        theirs.base_model.targeted_module_names)
    assert not any(p.startswith("score") for p in ours) and len(ours) == 8
    assert not isinstance(quant.quantize(params)["score"]["kernel"], quant.QuantizedArray)

