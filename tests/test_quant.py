"""QLoRA in JAX: LoRA on NF4 weights equals the dequantized model under grad, scan, DoRA and double
quantization; merge, multi, save_merged and counts on them; the compiled step's memory; errors.
bitsandbytes / transformers / PEFT parity is in test_quant_bnb.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from lora_jax import multi, quant
from lora_jax import peft as lp
from lora_jax.models import CausalLM, GPT2Config, from_pretrained


def _gpt2(scan, d=32, layers=2):
    cfg = GPT2Config(vocab_size=64, hidden_size=d, num_layers=layers, num_heads=4, intermediate_size=4 * d,
                     max_position_embeddings=32, scan_layers=scan)
    model = CausalLM(cfg)
    return model, model.init_params(jax.random.key(0))


def _nudged(config, params):
    adapters = lj.init(config, params, jax.random.key(1))
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    return jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("scan,dora,double,scheme", [(False, False, False, "nf4"), (True, False, True, "nf4"),
                                                     (True, True, False, "nf4"), (False, True, False, "int8")])
def test_lora_on_nf4_equals_the_dequantized_model(scan, dora, double, scheme):
    """LoRA (and DoRA) over NF4 weights (double-quantized or not) or int8 ones computes what it
    computes over the dequantized weights, values and gradients, unrolled and scanned, factored
    under strict=True; the merged strategy agrees; merge() gives dense adapted weights and leaves
    the others quantized, and with requantize=True quantizes those again as they were."""
    model, params = _gpt2(scan)
    qparams = quant.quantize(params, double_quant=double) if scheme == "nf4" else quant.quantize(params, scheme=scheme)
    dense = quant.dequantize(qparams)
    assert sum(isinstance(x, quant.QuantizedArray) for x in lj.tree.flatten(qparams).values()) == (4 if scan else 8)
    config = lj.LoraConfig(rank=4, alpha=8, targets=["c_attn", "c_fc"], use_dora=dora)
    adapters = _nudged(config, qparams)
    ids = jnp.arange(16).reshape(2, 8) % 64
    g = jax.jit(lj.apply(model.apply, config, strict=True))
    np.testing.assert_allclose(g(qparams, adapters, ids), g(dense, adapters, ids), atol=1e-6, rtol=1e-6)
    merged = jax.jit(lj.apply(model.apply, config, strategy="merged"))
    np.testing.assert_allclose(merged(qparams, adapters, ids), g(dense, adapters, ids), atol=1e-5, rtol=0)

    def loss(p):
        return lambda a: jnp.sum(g(p, a, ids) ** 2)
    got, want = jax.grad(loss(qparams))(adapters), jax.grad(loss(dense))(adapters)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5)

    merged_params = lj.merge(config, jax.tree.map(jnp.copy, qparams), adapters)  # merge donates its input
    folded = lj.tree.flatten(merged_params)
    assert {p for p, x in folded.items() if isinstance(x, quant.QuantizedArray)} == \
        {p for p, x in lj.tree.flatten(qparams).items() if isinstance(x, quant.QuantizedArray)} - set(adapters)
    np.testing.assert_allclose(jax.jit(quant.apply(model.apply))(merged_params, ids), g(dense, adapters, ids),
                               atol=1e-5, rtol=0)
    # requantize=True: each merged weight (a layer stack when scanned) quantized as it was
    again = lj.tree.flatten(lj.merge(config, jax.tree.map(jnp.copy, qparams), adapters, requantize=True))
    for p in adapters:
        was, now = lj.tree.flatten(qparams)[p], again[p]
        want = quant.quantize({"w": folded[p]}, targets=["w"], scheme=scheme, double_quant=double,
                              **({"block_size": was.block_size} if scheme == "nf4" else {}))["w"]
        assert (now.shape, now.dtype, now.block_size) == (was.shape, was.dtype, was.block_size)
        for x, y in zip(jax.tree.leaves(now), jax.tree.leaves(want)):
            np.testing.assert_array_equal(x, y, err_msg=p)


def test_summary_multi_and_merged_export_on_nf4(tmp_path):
    """Counts see NF4 weights as the matrices they stand for; mixed-adapter batches run over them;
    save_merged writes a dense checkpoint (NF4 weights dequantized) that equals the model."""
    model, params = _gpt2(False)
    qparams = quant.quantize(params, dtype=jnp.float32)
    config = lj.LoraConfig(rank=2, targets=["c_attn"])
    adapters = _nudged(config, qparams)
    assert lj.summary(config, qparams, adapters).total == lj.summary(config, params, adapters).total
    assert quant.nbytes(qparams) < 0.35 * quant.nbytes(params)
    ids = jnp.arange(16).reshape(2, 8) % 64
    m = multi.multi(model.apply, {"a": config})
    dense = quant.dequantize(qparams)
    mixed = m.mixed(qparams, {"a": adapters}, ids, adapter_ids=m.ids(["a", None]))
    np.testing.assert_allclose(mixed, m.mixed(dense, {"a": adapters}, ids, adapter_ids=m.ids(["a", None])), atol=1e-6)
    base = m.switch(qparams, {"a": adapters}, ids, adapter=None)
    np.testing.assert_allclose(base, model.apply(dense, ids), atol=1e-6)
    out = lp.save_merged(tmp_path / "merged", model.config, qparams, config, adapters)
    _, reloaded = from_pretrained(out)
    np.testing.assert_allclose(model.apply(reloaded, ids), lj.apply(model.apply, config)(dense, adapters, ids),
                               atol=1e-5)


@pytest.mark.parametrize("scheme,saved", [("nf4", 0.8), ("int8", 0.7)])
def test_nf4_train_step_memory_is_the_codes_not_dense_weights(scheme, saved):
    """Compiled memory of a QLoRA (or int8) train step (GPT-2 shapes, 4 layers, d=256): the frozen
    weights take under 0.2x (int8: 0.3x) their fp32 bytes, and the step's temporaries stay below
    the dense weights' size, unrolled, scanned and rematerialised (no layer's dequantized weight is
    held across the passes; under remat the untargeted weights enter the checkpoint as codes too)."""
    config = lj.LoraConfig(rank=8, alpha=16, targets=["c_attn"])
    ids = jnp.zeros((2, 16), jnp.int32)

    def memory(model, params):
        apply = lj.apply(model.apply, config)

        def loss_fn(p, a, ids):
            return optax.softmax_cross_entropy_with_integer_labels(apply(p, a, ids)[:, :-1], ids[:, 1:]).mean()

        ts = lj.make_train_step(loss_fn, optax.adamw(1e-3))
        trainable, frozen = lj.split(config, params, lj.init(config, params, jax.random.key(1)))
        c = jax.jit(ts.step).lower(trainable, frozen, ts.init(trainable), ids).compile()
        return c.memory_analysis()

    for scan, remat in ((False, False), (True, False), (False, True)):
        model, params = _gpt2(scan, d=256, layers=4)
        model = CausalLM(model.config.replace(remat=remat))
        weights = sum(x.nbytes for p, x in lj.tree.flatten(params).items() if p.endswith("kernel"))
        dense, nf4 = memory(model, params), memory(model, quant.quantize(params, scheme=scheme))
        assert nf4.argument_size_in_bytes < dense.argument_size_in_bytes - saved * weights
        assert nf4.temp_size_in_bytes < 0.5 * weights, (scan, remat, nf4.temp_size_in_bytes, weights)


def test_quantize_errors():
    model, params = _gpt2(False)
    with pytest.raises(ValueError, match="block_size 48 is not one of"):
        quant.quantize(params, block_size=48)
    with pytest.raises(ValueError, match=r"select no weight; closest paths: .*c_attn"):
        quant.quantize(params, targets=["c_atn"])
    with pytest.raises(ValueError, match="select no weight"):
        quant.quantize(params, targets=".*ln_1/scale")  # a norm's gain is no linear weight
    with pytest.raises(ValueError, match=r"'layer/w' \(float32, shape \(4,\)\) is not a float matrix"):
        quant.quantize({"layer": {"w": jnp.ones(4)}}, targets=["layer"])
    with pytest.raises(ValueError, match=r"'transformer/h/0/attn/c_attn/kernel' is already quantized"):
        quant.quantize(quant.quantize(params), targets=["c_attn"])
    kernel = lj.tree.flatten(quant.quantize(params))["transformer/h/0/attn/c_attn/kernel"]
    with pytest.raises(ValueError, match=r"requantize: shape \(3, 4\) is not the quantized weight's \(32, 96\)"):
        quant.requantize(jnp.zeros((3, 4)), kernel)


def test_quantized_matmul_on_an_empty_batch():
    """A matmul of NF4 or int8 weights with an activation of no elements (an empty batch) gives the
    empty result, forward and backward, with and without LoRA, as dense weights do (the quantized
    matmul read the activation's first element)."""
    params = {"layer": {"kernel": jax.random.normal(jax.random.key(0), (64, 32))}}
    config = lj.LoraConfig(rank=2, targets=["layer"])

    def f(p, x):
        return x @ p["layer"]["kernel"]
    for scheme in ("nf4", "int8"):
        qparams = quant.quantize(params, scheme=scheme)
        x = jnp.ones((0, 64))
        assert quant.apply(f)(qparams, x).shape == (0, 32)
        assert jax.grad(lambda x: quant.apply(f)(qparams, x).sum())(x).shape == (0, 64)
        adapters = lj.init(config, qparams, jax.random.key(1))
        assert lj.apply(f, config)(qparams, adapters, x).shape == (0, 32)
