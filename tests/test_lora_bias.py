"""lora_bias (PEFT's `lora_bias=True`): lora_B with a bias, s * b added to the module's bias;
against PEFT both ways, merge / unmerge, checkpoints, LoRA+ groups, what is refused."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from lora_jax import checkpoint, multi
from lora_jax import peft as lp
from lora_jax.models import from_pretrained

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from test_peft import ATOL, IDS, hf_model, torch_logits  # noqa: E402

TARGETS = {"gpt2": ["c_attn", "c_fc"], "bloom": ["query_key_value", "dense_h_to_4h"]}


@pytest.mark.parametrize("name,scan", [("gpt2", False), ("bloom", True)])
def test_lora_bias_matches_peft_both_ways(name, scan, tiny_gpt2_dir, tiny_bloom_dir, tmp_path, nudge_torch):
    base_dir = {"gpt2": tiny_gpt2_dir, "bloom": tiny_bloom_dir}[name]
    model, params = from_pretrained(base_dir, scan_layers=scan)
    config = lj.LoraConfig(rank=4, alpha=8, targets=TARGETS[name], lora_bias=True,
                           alpha_pattern={".*h/1/.*": 16.0} if not scan else {})
    g = lj.apply(model.apply, config, strict=True)

    def loss_fn(p, a, ids):
        return optax.softmax_cross_entropy_with_integer_labels(g(p, a, ids)[:, :-1], ids[:, 1:]).mean()

    adapters = lj.init(config, params, jax.random.key(0))
    assert all(ab[lj.LORA_BIAS].shape == ab["lora_B"].shape[:-2] + ab["lora_B"].shape[-1:] for ab in adapters.values())
    np.testing.assert_allclose(g(params, adapters, IDS), model.apply(params, IDS), atol=1e-5)  # zero bias at init
    ts = lj.make_train_step(loss_fn, optax.adam(1e-2))
    trainable, frozen = lj.split(config, params, adapters)
    opt, step = ts.init(trainable), jax.jit(ts.step)
    for _ in range(3):
        trainable, opt, _ = step(trainable, frozen, opt, IDS)
    params, adapters = lj.join(trainable, frozen)
    # every bias trained (a key bias's gradient is zero: softmax ignores a constant shift of the keys)
    assert all(float(jnp.median(jnp.abs(ab[lj.LORA_BIAS]))) > 1e-3 for ab in adapters.values())
    logits = np.asarray(jax.jit(g)(params, adapters, IDS))
    np.testing.assert_allclose(lj.apply(model.apply, config, strategy="merged")(params, adapters, IDS), logits,
                               atol=1e-5, rtol=0)
    merged = lj.merge(config, jax.tree.map(jnp.array, params), adapters)
    np.testing.assert_allclose(model.apply(merged, IDS), logits, atol=1e-5, rtol=0)
    again = lj.unmerge(config, merged, adapters)  # the biases come back too
    for x, y in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
        np.testing.assert_allclose(x, y, atol=1e-5)

    out = lp.save_peft(tmp_path / "ours", config, adapters, model_config=model.config)
    assert json.loads((out / lp.CONFIG_FILE).read_text())["lora_bias"] is True
    with pytest.warns() as record:
        pm = peft.PeftModel.from_pretrained(hf_model(base_dir), str(out)).eval()
    assert not [w for w in record if "missing adapter keys" in str(w.message)]
    np.testing.assert_allclose(torch_logits(pm), logits, atol=ATOL, rtol=0)
    back = lp.load_peft(out, params, model_config=model.config)
    assert back.config.lora_bias
    for p, ab in adapters.items():
        np.testing.assert_allclose(back.adapters[p][lj.LORA_BIAS], ab[lj.LORA_BIAS], atol=1e-6)

    # A PEFT-made adapter (its biases nudged from zero) gives PEFT's logits here.
    made = peft.get_peft_model(hf_model(base_dir), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[name],
                                                                    lora_bias=True))
    nudge_torch(made, seed=4).save_pretrained(tmp_path / "made")
    got = lp.load_peft(tmp_path / "made", params, model_config=model.config)
    np.testing.assert_allclose(np.asarray(lj.apply(model.apply, got.config)(params, got.adapters, IDS)),
                               torch_logits(made), atol=ATOL, rtol=0)


def test_lora_bias_checkpoint_flax_attention_loraplus_and_refusals(tiny_gpt2_dir, tmp_path):
    model, params = from_pretrained(tiny_gpt2_dir)
    config = lj.LoraConfig(rank=4, targets=["c_attn"], lora_bias=True)
    adapters = jax.tree.map(lambda x: x + 0.1, lj.init(config, params, jax.random.key(0)))
    checkpoint.save(tmp_path / "ad", config, adapters, params=params)
    back = checkpoint.load(tmp_path / "ad", params)
    assert back.config == config
    np.testing.assert_array_equal(back.adapters["transformer/h/0/attn/c_attn/kernel"][lj.LORA_BIAS],
                                  adapters["transformer/h/0/attn/c_attn/kernel"][lj.LORA_BIAS])
    groups = lj.optim.loraplus_labels(adapters)
    assert groups["transformer/h/0/attn/c_attn/kernel"] == {"lora_A": "A", "lora_B": "B", lj.LORA_BIAS: "B"}

    # PiSSA starts the bias at zero too; Flax attention's [H, Dh] biases take the [H*Dh] bias reshaped.
    pissa = lj.LoraConfig(rank=4, targets=["c_attn"], lora_bias=True, init="pissa")
    res, start = lj.init_residual(pissa, params, jax.random.key(0))
    assert float(jnp.abs(start["transformer/h/0/attn/c_attn/kernel"][lj.LORA_BIAS]).max()) == 0.0
    attn = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=32)
    x = jax.random.normal(jax.random.key(1), (2, 5, 32))
    ap = attn.init(jax.random.key(0), x)
    acfg = lj.LoraConfig(rank=4, targets=["query", "out"], axes_pattern=lj.FLAX_ATTENTION_AXES, lora_bias=True)
    aad = jax.tree.map(lambda v: v + 0.1, lj.init(acfg, ap, jax.random.key(1)))
    assert aad["params/query/kernel"][lj.LORA_BIAS].shape == (32,)
    np.testing.assert_allclose(jax.jit(lj.apply(attn.apply, acfg, strict=True))(ap, aad, x),
                               lj.apply(attn.apply, acfg, strategy="merged")(ap, aad, x), atol=1e-5)

    with pytest.raises(ValueError, match="lora_bias with use_dora"):
        lj.LoraConfig(lora_bias=True, use_dora=True)
    with pytest.raises(ValueError, match=r"'transformer/wte/embedding' has no bias"):
        lj.init(lj.LoraConfig(targets=["c_attn", "wte"], lora_bias=True), params, jax.random.key(0))
    mlp = nn.Dense(4, use_bias=False)
    mp = mlp.init(jax.random.key(0), jnp.ones((1, 8)))
    with pytest.raises(ValueError, match=r"lora_bias adds to the bias.*'params/kernel' has no bias"):
        lj.init(lj.LoraConfig(rank=2, targets=".*kernel", lora_bias=True), mp, jax.random.key(0))
    m = multi.multi(model.apply, {"b": config})
    with pytest.raises(ValueError, match=r"\['b'\] have a lora_B bias"):
        m.mixed(params, {"b": adapters}, IDS, adapter_ids=m.ids(["b", None]))
    with pytest.raises(ValueError, match=r"\['b'\] have a lora_B bias"):
        multi.hotswappable({"b": config}, {"b": adapters})
