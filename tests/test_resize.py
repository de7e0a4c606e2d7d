"""resize_token_embeddings (transformers' resize) and PEFT files that carry the resized table."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax import peft as lp
from lora_jax.checkpoint import update_params
from lora_jax.models import SequenceClassifier, from_pretrained, resize_token_embeddings, save_hf_checkpoint

NEW = [320, 321, 322, 323]  # the tiny checkpoints have 320 tokens
IDS = np.array([[5, 9, 320, 33, 323, 7], [40, 41, 321, 3, 322, 3]])


def _hf(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()


@pytest.mark.parametrize("name", ["gpt2", "bloom"])
def test_matches_transformers_resize(name, tiny_gpt2_dir, tiny_bloom_dir, tmp_path):
    """Grown (and padded to a multiple) or shrunk, the table, the config and the logits are
    transformers' (its new rows are the old rows' mean plus 1e-9-covariance noise); the resized
    model exports as a checkpoint transformers loads."""
    torch = pytest.importorskip("torch")
    directory = {"gpt2": tiny_gpt2_dir, "bloom": tiny_bloom_dir}[name]
    model, params = from_pretrained(directory)
    table = lambda p: np.asarray(p["transformer"][model.config.embed_name]["embedding"])  # noqa: E731
    for size, pad, ids in [(323, 8, IDS), (300, None, IDS % 300)]:
        hf = _hf(directory)
        hf.resize_token_embeddings(size, pad_to_multiple_of=pad)
        big, big_params = resize_token_embeddings(model, params, size, pad_to_multiple_of=pad)
        want_table = hf.get_input_embeddings().weight.detach().numpy()
        assert big.config.vocab_size == hf.config.vocab_size == want_table.shape[0] == (328 if pad else 300)
        n = min(320, want_table.shape[0])
        np.testing.assert_array_equal(table(big_params)[:n], table(params)[:n])
        np.testing.assert_allclose(table(big_params), want_table, atol=1e-4, rtol=0)
        with torch.no_grad():
            want = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
        # transformers' rows, noise included (1e-9 of the covariance: ~1e-4 in these logits)
        big_params = update_params(big_params, {f"transformer/{big.config.embed_name}/embedding": want_table})
        got = np.asarray(jax.jit(big.apply)(big_params, ids))
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    save_hf_checkpoint(tmp_path / "resized", big.config, big_params)
    with torch.no_grad():
        again = _hf(tmp_path / "resized")(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(again, got, atol=1e-4, rtol=0)


def test_new_rows_and_refusals(tiny_gpt2_dir):
    model, params = from_pretrained(tiny_gpt2_dir)
    table = params["transformer"]["wte"]["embedding"]
    mean = np.asarray(table).mean(0)
    _, exact = resize_token_embeddings(model, params, 322)
    np.testing.assert_allclose(exact["transformer"]["wte"]["embedding"][320:], np.stack([mean, mean]), atol=1e-6)
    _, noisy = resize_token_embeddings(model, params, 322, key=jax.random.key(0))
    gap = np.abs(np.asarray(noisy["transformer"]["wte"]["embedding"][320:]) - mean)
    assert 0 < gap.max() < 1e-3  # transformers' N(mean, 1e-9 * cov): a nudge
    _, drawn = resize_token_embeddings(model, params, 420, mean_resizing=False, key=jax.random.key(0))
    assert 0.015 < float(jnp.std(drawn["transformer"]["wte"]["embedding"][320:])) < 0.025  # N(0, 0.02)
    assert resize_token_embeddings(model, params, 320) == (model, params)
    clf = SequenceClassifier(model.config, num_labels=3)
    clf_params = params | clf.init_head(jax.random.key(1))
    clf2, clf_params2 = resize_token_embeddings(clf, clf_params, 330)
    assert isinstance(clf2, SequenceClassifier) and clf2.num_labels == 3 and clf2.config.vocab_size == 330
    assert clf2.apply(clf_params2, jnp.array([[325, 3, 4]])).shape == (1, 3)

    with pytest.raises(ValueError, match="eos_token_id is 310"):
        resize_token_embeddings(dataclasses.replace(model, config=model.config.replace(eos_token_id=310)), params, 300)
    with pytest.raises(ValueError, match="pass key="):
        resize_token_embeddings(model, params, 330, mean_resizing=False)
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        resize_token_embeddings(model, params, 330, pad_to_multiple_of=0)
    with pytest.raises(ValueError, match="new_num_tokens"):
        resize_token_embeddings(model, params, -3)


def test_peft_files_with_the_resized_table_both_ways(tiny_gpt2_dir, tmp_path, nudge_torch):
    """New tokens trained as trainable_tokens beside a LoRA: our file with save_embedding_layers
    loads into PEFT on a base resized by transformers, PEFT's own such file (with its lm_head
    copies) loads here, both with the same logits; on the old vocabulary the error says to resize."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    model, params = from_pretrained(tiny_gpt2_dir)
    model, params = resize_token_embeddings(model, params, 324)
    # rows the base model does not have (here: 5 and 9 changed) show that PEFT takes the file's table
    params = update_params(params, {"transformer/wte/embedding": params["transformer"]["wte"]["embedding"].at[
        jnp.array([5, 9])].add(0.5)})
    config = lj.LoraConfig(rank=4, alpha=8, targets=["c_attn"], trainable_tokens={"wte": NEW})
    adapters = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape),
                            lj.init(config, params, jax.random.key(0)))
    mine = np.asarray(jax.jit(lj.apply(model.apply, config))(params, adapters, IDS))
    out = lp.save_peft(tmp_path / "ours", config, adapters, model_config=model.config, params=params,
                       save_embedding_layers=True)
    hf = _hf(tiny_gpt2_dir)
    hf.resize_token_embeddings(324)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(hf, str(out)).eval()(torch.tensor(IDS, dtype=torch.long)).logits
    np.testing.assert_allclose(theirs.numpy(), mine, atol=1e-4, rtol=0)

    hf = _hf(tiny_gpt2_dir)
    hf.resize_token_embeddings(324)
    pm = nudge_torch(peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                             trainable_token_indices=NEW)), seed=2)
    pm.save_pretrained(tmp_path / "theirs", save_embedding_layers=True)
    with torch.no_grad():
        want = pm(torch.tensor(IDS, dtype=torch.long)).logits.numpy()
    _, base = from_pretrained(tiny_gpt2_dir)
    got = lp.load_peft(tmp_path / "theirs", params, model_config=model.config)
    assert list(got.extras) == ["transformer/wte/embedding"]
    loaded = update_params(params, got.extras)
    logits = np.asarray(jax.jit(lj.apply(model.apply, got.config))(loaded, got.adapters, IDS))
    np.testing.assert_allclose(logits, want, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match=r"resize_token_embeddings\(model, params, 324\)"):
        lp.load_peft(tmp_path / "theirs", base, model_config=model.config)

    from safetensors.numpy import load_file, save_file
    weights = tmp_path / "theirs" / lp.WEIGHTS_FILE
    tensors = load_file(weights)
    tensors["base_model.model.lm_head.token_adapter.base_layer.weight"] += 1.0  # an untied head
    save_file(tensors, weights)
    with pytest.raises(ValueError, match="lm_head.token_adapter.base_layer.weight.*not a copy"):
        lp.load_peft(tmp_path / "theirs", params, model_config=model.config)


@pytest.mark.parametrize("key, msg", [("kasa_config", "kasa_config {'some': 'settings'} is not PEFT's KasaConfig"),
                                      ("arrow_config", r"an Arrow router \(arrow_config\) holds no adapter"),
                                      ("use_qalora", "use_qalora="), ("layer_replication", "layer_replication=")])
def test_peft_variants_that_change_the_forward_are_refused(key, msg, tiny_gpt2_dir, tmp_path):
    model, params = from_pretrained(tiny_gpt2_dir)
    config = lj.LoraConfig(rank=2, targets=["c_attn"])
    out = lp.save_peft(tmp_path, config, lj.init(config, params, jax.random.key(0)), model_config=model.config,
                       overwrite=True)
    cfg = json.loads((out / lp.CONFIG_FILE).read_text()) | {key: {"some": "settings"}}
    (out / lp.CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=msg):
        lp.load_peft(out, params)
