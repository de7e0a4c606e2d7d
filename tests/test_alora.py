"""Activated LoRA (PEFT's aLoRA): the adapter acts from the invocation tokens onwards only."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from lora_jax import multi
from lora_jax import peft as lp
from lora_jax.models import CausalLM, GPT2Config, from_pretrained, generate

IDS = np.array([[5, 17, 42, 99, 3, 250, 7, 12],     # invoked at 2
                [1, 2, 3, 4, 5, 6, 7, 300],         # never: the base model
                [42, 99, 9, 9, 42, 99, 8, 7]], np.int32)  # the last occurrence counts: 4
INVOKE = [42, 99]


def test_alora_mask_marks_the_last_invocation_onwards():
    config = lj.LoraConfig(rank=2, targets=["c_attn"], alora_invocation_tokens=INVOKE)
    want = np.zeros(IDS.shape, bool)
    want[0, 2:], want[2, 4:] = True, True
    np.testing.assert_array_equal(lj.alora_mask(config, IDS), want)
    np.testing.assert_array_equal(jax.jit(lambda x: lj.alora_mask(config, x))(IDS), want)
    assert not lj.alora_mask(config, IDS[:, :1]).any()
    # Packed (segment_ids): each sequence as its own row; an invocation across two sequences is none.
    packed, seg = IDS.reshape(1, -1), np.repeat(np.arange(1, 4), 8)[None]
    np.testing.assert_array_equal(lj.alora_mask(config, packed, seg), want.reshape(1, -1))
    cut = np.array([[42, 99, 5, 42, 99, 6, 0, 0]]), np.array([[1, 1, 1, 1, 2, 2, 0, 0]])  # 42 | 99 split
    np.testing.assert_array_equal(lj.alora_mask(config, *cut), [[1, 1, 1, 1, 0, 0, 0, 0]])


@pytest.mark.parametrize("name", ["gpt2", "bloom"])
def test_matches_peft_alora_both_ways(name, tiny_gpt2_dir, tiny_bloom_dir, tmp_path, nudge_torch):
    """A PEFT aLoRA adapter loads with its invocation tokens and gives PEFT's logits (which finds
    the invocation itself); exported again, PEFT loads ours and agrees too."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base_dir = {"gpt2": tiny_gpt2_dir, "bloom": tiny_bloom_dir}[name]
    hf = lambda: AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager").eval()  # noqa: E731
    targets = {"gpt2": ["c_attn", "c_fc"], "bloom": ["query_key_value", "dense_h_to_4h"]}[name]
    pm = nudge_torch(peft.get_peft_model(hf(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, alora_invocation_tokens=INVOKE, task_type="CAUSAL_LM")), seed=3)
    pm.save_pretrained(tmp_path / "theirs")
    with torch.no_grad():
        want = pm(torch.tensor(IDS, dtype=torch.long)).logits.numpy()

    model, params = from_pretrained(base_dir)
    got = lp.load_peft(tmp_path / "theirs", params)
    assert got.config.alora_invocation_tokens == tuple(INVOKE)
    g = jax.jit(lj.apply(model.apply, got.config, strict=True))
    logits = np.asarray(g(params, got.adapters, IDS, lora_mask=lj.alora_mask(got.config, IDS)))
    np.testing.assert_allclose(logits, want, atol=1e-4, rtol=0)
    base = np.asarray(jax.jit(model.apply)(params, IDS))
    np.testing.assert_array_equal(logits[1], base[1])  # no invocation: the base model, exactly
    np.testing.assert_array_equal(logits[0, :2], base[0, :2])  # before it too
    assert np.abs(logits[0, 2:] - base[0, 2:]).max() > 1e-2
    # The three rows packed into one (segment_ids): each sequence still gets PEFT's logits of its own row.
    packed, seg = IDS.reshape(1, -1), np.repeat(np.arange(1, 4), IDS.shape[1])[None]
    np.testing.assert_allclose(np.asarray(g(params, got.adapters, packed, segment_ids=seg, lora_mask=lj.alora_mask(
        got.config, packed, seg)))[0], want.reshape(-1, want.shape[-1]), atol=1e-4, rtol=0)

    out = lp.save_peft(tmp_path / "ours", got.config, got.adapters, model_config=model.config)
    assert json.loads((out / lp.CONFIG_FILE).read_text())["alora_invocation_tokens"] == INVOKE
    with torch.no_grad():
        again = peft.PeftModel.from_pretrained(hf(), str(out)).eval()(torch.tensor(IDS, dtype=torch.long)).logits
    np.testing.assert_allclose(again.numpy(), logits, atol=1e-4, rtol=0)


def test_cache_before_the_invocation_is_the_base_models_and_generation_continues_it():
    """The KV cache of the tokens before the invocation equals the base model's (aLoRA's point:
    it can be shared); generation with the cache equals recomputing the whole sequence; only
    invoked tokens get gradients."""
    model = CausalLM(GPT2Config(vocab_size=320, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                                max_position_embeddings=32, scan_layers=True))
    params = model.init_params(jax.random.key(0))
    config = lj.LoraConfig(rank=4, alpha=8, targets=["c_attn", "c_fc", "mlp/c_proj"], alora_invocation_tokens=INVOKE)
    adapters = jax.tree.map(lambda x: x + 0.2, lj.init(config, params, jax.random.key(1)))
    g = lj.apply(model.apply, config, strict=True)
    ids, mask = jnp.asarray(IDS), jnp.ones(IDS.shape, jnp.int32)
    _, cache = g(params, adapters, ids, mask, cache=model.init_cache(3, 8), lora_mask=lj.alora_mask(config, ids))
    _, base_cache = model.apply(params, ids, mask, cache=model.init_cache(3, 8))
    for kv in ("k", "v"):
        np.testing.assert_array_equal(cache[kv][:, 0, :2], base_cache[kv][:, 0, :2])
        np.testing.assert_array_equal(cache[kv][:, 1], base_cache[kv][:, 1])
        assert np.abs(cache[kv][:, 0, 3:] - base_cache[kv][:, 0, 3:]).max() > 1e-3

    prompt_mask = lj.alora_mask(config, ids)

    def alora_apply(p, x, m, **kw):  # new tokens follow the prompt, invoked where the prompt was
        return g(p, adapters, x, m, lora_mask=prompt_mask if x.shape[1] == ids.shape[1] else prompt_mask[:, -1:],
                 **kw)
    new = generate(alora_apply, params, ids, mask, model=model, max_new_tokens=4, eos_token_id=None)
    full = jnp.concatenate([ids, new], axis=1)
    logits = g(params, adapters, full, lora_mask=lj.alora_mask(config, full))
    np.testing.assert_array_equal(jnp.argmax(logits[:, 7:-1], axis=-1), new)

    def loss(a, rows):
        out = g(params, a, ids[rows], lora_mask=lj.alora_mask(config, ids[rows]))
        return optax.softmax_cross_entropy_with_integer_labels(out[:, :-1], ids[rows, 1:]).mean()
    assert all(not np.any(x) for x in jax.tree.leaves(jax.grad(loss)(adapters, np.array([1]))))
    assert all(np.any(x) for x in jax.tree.leaves(jax.grad(loss)(adapters, np.array([0]))))


def test_alora_refusals():
    model = CausalLM(GPT2Config(vocab_size=320, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64,
                                max_position_embeddings=32))
    params = model.init_params(jax.random.key(0))
    config = lj.LoraConfig(rank=2, targets=["c_attn"], alora_invocation_tokens=INVOKE)
    adapters = lj.init(config, params, jax.random.key(1))
    with pytest.raises(ValueError, match="this config is aLoRA .*pass lora_mask="):
        lj.apply(model.apply, config)(params, adapters, IDS)
    with pytest.raises(ValueError, match="lora_mask .2, 8. does not line up with the tokens of the input of "
                                         "'transformer/h/0/attn/c_attn/kernel'"):
        lj.apply(model.apply, config)(params, adapters, IDS, lora_mask=np.ones((2, 8), bool))
    with pytest.raises(ValueError, match="the merged strategy has one weight"):
        lj.apply(model.apply, config, strategy="merged")(params, adapters, IDS, lora_mask=lj.alora_mask(config, IDS))
    with pytest.raises(ValueError, match="cannot be merged into the weights"):
        lj.merge(config, params, adapters)
    with pytest.raises(ValueError, match="act on some tokens only .aLoRA., which a mixed batch cannot"):
        multi.multi(model.apply, {"a": config}).mixed(params, {"a": adapters}, IDS, adapter_ids=np.zeros(3, int))
    with pytest.raises(ValueError, match="aLoRA .alora_invocation_tokens. adapts linear layers; "
                                         "'transformer/wte/embedding' is not one"):
        lj.init(lj.LoraConfig(rank=2, targets=["wte"], alora_invocation_tokens=INVOKE), params, jax.random.key(0))
    for kw in (dict(use_dora=True), dict(lora_bias=True), dict(trainable_tokens=[1])):
        with pytest.raises(ValueError, match="acts on some tokens only, which"):
            lj.LoraConfig(alora_invocation_tokens=INVOKE, **kw)
    with pytest.raises(ValueError, match="alora_invocation_tokens must be a non-empty list of token ids"):
        lj.LoraConfig(alora_invocation_tokens=[])
    assert lj.LoraConfig.from_json(config.to_json()) == config
