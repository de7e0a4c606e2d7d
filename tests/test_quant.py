"""QLoRA: NF4 frozen weights equal bitsandbytes', LoRA on them equals transformers + bitsandbytes +
PEFT both ways, factored == dense reference under grad and scan, and the compiled step's memory."""

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

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
bnb_functional = pytest.importorskip("bitsandbytes.functional")

IDS = np.array([[5, 17, 42, 99, 3, 250, 7, 12], [1, 2, 3, 4, 5, 6, 7, 300]], np.int32)
ATOL = 1e-4


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


@pytest.mark.parametrize("scan,dora,double", [(False, False, False), (True, False, True), (True, True, False)])
def test_lora_on_nf4_equals_the_dequantized_model(scan, dora, double):
    """LoRA (and DoRA) over NF4 weights (double-quantized or not) computes what it computes over
    the dequantized weights, values and gradients, unrolled and scanned, factored under
    strict=True; the merged strategy agrees; merge() gives dense adapted weights and leaves the
    others NF4."""
    model, params = _gpt2(scan)
    qparams = quant.quantize(params, double_quant=double)
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


def test_nf4_train_step_memory_is_the_codes_not_dense_weights():
    """Compiled memory of a QLoRA train step (GPT-2 shapes, 4 layers, d=256): the frozen weights
    take under 0.2x their fp32 bytes, and the step's temporaries stay below the dense weights'
    size, unrolled and scanned (no layer's dequantized weight is held across the passes)."""
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

    for scan in (False, True):
        model, params = _gpt2(scan, d=256, layers=4)
        weights = sum(x.nbytes for p, x in lj.tree.flatten(params).items() if p.endswith("kernel"))
        dense, nf4 = memory(model, params), memory(model, quant.quantize(params))
        assert nf4.argument_size_in_bytes < dense.argument_size_in_bytes - 0.8 * weights
        assert nf4.temp_size_in_bytes < 0.5 * weights, (scan, nf4.temp_size_in_bytes, weights)


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


@pytest.mark.parametrize("shape,block", [((128, 96), 64), ((30, 10), 64), ((48, 144), 128)])
def test_nf4_codes_equal_bitsandbytes(shape, block):
    """Codes and absmax equal bitsandbytes' quantize_4bit of the torch Linear weight (out, in) =
    our kernel transposed, a last partial block included (30 x 10); so do the dequantized values,
    where bitsandbytes 0.50's CPU dequantize_4bit is right: for rows of 144 it returns values up to
    1.6 away from its own codes (max NF4 rounding error here: 0.49), so (48, 144) compares codes only."""
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    codes, absmax = quant.quantize_nf4(jnp.asarray(w), block)
    q, state = bnb_functional.quantize_4bit(torch.from_numpy(w.T.copy()), blocksize=block, quant_type="nf4")
    n = w.size
    np.testing.assert_array_equal(np.asarray(codes)[: n // 2], q.numpy().reshape(-1)[: n // 2])
    np.testing.assert_array_equal(np.asarray(absmax), state.absmax.numpy())
    ours = np.asarray(quant.dequantize_nf4(codes, absmax, shape, block, jnp.float32))
    # NF4 rounding: each value is within half the widest gap between levels of its block's scale.
    gap = np.diff(quant.NF4).max() / 2
    blocks = np.pad(w.T.reshape(-1), (0, -n % block)).reshape(-1, block)
    bound = np.repeat(np.abs(blocks).max(-1), block)[:n].reshape(shape[::-1]).T * gap
    assert (np.abs(ours - w) <= bound + 1e-6).all()
    if shape != (48, 144):
        np.testing.assert_array_equal(ours, bnb_functional.dequantize_4bit(q, state).numpy().T)


def test_double_quant_matches_bitsandbytes_nested_statistics():
    """Double quantization as bitsandbytes' `compress_statistics=True` stores it: the same dynamic
    map, offset (mean absmax) and second-level absmax; bitsandbytes' dequantization of its own
    state equals ours of that state. The 8-bit codes agree on >= 99% of the absmax: ours are the
    nearest map value, bitsandbytes' CPU search misses it for some values near a midpoint."""
    np.testing.assert_array_equal(quant.DYNAMIC, bnb_functional.create_dynamic_map(signed=True).numpy())
    w = np.random.default_rng(1).standard_normal((512, 256)).astype(np.float32) * 0.02  # 2048 blocks
    q, state = bnb_functional.quantize_4bit(torch.from_numpy(w.T.copy()), blocksize=64, quant_type="nf4",
                                            compress_statistics=True)
    codes, absmax = quant.quantize_nf4(jnp.asarray(w), 64)
    qa, absmax2, offset = quant.quantize_absmax(absmax)
    np.testing.assert_allclose(np.asarray(offset), state.offset.item(), rtol=1e-7)
    np.testing.assert_array_equal(np.asarray(absmax2), state.state2.absmax.numpy())
    ref = state.absmax.numpy()
    agree = np.asarray(qa) == ref
    assert agree.mean() >= 0.99
    centred = (np.asarray(absmax) - np.asarray(offset)) / np.repeat(np.asarray(absmax2), 256)
    ours, theirs = np.abs(quant.DYNAMIC[np.asarray(qa)] - centred), np.abs(quant.DYNAMIC[ref] - centred)
    assert (ours <= theirs).all() and (ours[~agree] < theirs[~agree]).all()

    state_q = quant.QuantizedArray(jnp.asarray(q.numpy().reshape(-1)), jnp.asarray(ref),
                                   jnp.asarray(state.state2.absmax.numpy()), jnp.float32(state.offset.item()),
                                   w.shape, jnp.dtype(jnp.float32), 64)
    np.testing.assert_allclose(np.asarray(state_q.materialise()), bnb_functional.dequantize_4bit(q, state).numpy().T,
                               rtol=1e-6, atol=1e-7)
    ours_q = quant.quantize({"w": jnp.asarray(w)}, targets=["w"], double_quant=True)["w"]
    single = quant.quantize({"w": jnp.asarray(w)}, targets=["w"])["w"]
    assert np.abs(np.asarray(ours_q.materialise() - single.materialise())).max() < 0.01 * np.abs(w).max()
    assert quant.nbytes(ours_q) * 8 / w.size < 4.13 < 4.5 <= quant.nbytes(single) * 8 / w.size


def _bnb_model(directory):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(directory, quantization_config=qc, device_map="cpu")


def _hf_model(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()


def _logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(IDS, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("name,scan", [("gpt2", False), ("bloom", True)])
def test_qlora_matches_bitsandbytes_and_peft(name, scan, wide_dirs, tmp_path, nudge_torch):
    """quantize() of a checkpoint holds the codes and absmax transformers' 4-bit loading
    (bitsandbytes) holds. The reference is transformers' fp32 model with bitsandbytes' own
    dequantization of those weights (bitsandbytes' CPU forward rounds absmax to bf16, so its
    logits are not the reference): the NF4 base, a PEFT-made adapter on it, and an adapter trained
    here on the NF4 base and loaded by PEFT all give its logits; loaded by PEFT on transformers'
    4-bit model, that adapter gives them to within bitsandbytes' CPU rounding."""
    base_dir = wide_dirs[name]
    targets = {"gpt2": ["c_attn", "c_fc"], "bloom": ["query_key_value", "dense_4h_to_h"]}[name]
    model, params = from_pretrained(base_dir, scan_layers=scan)
    qparams = quant.quantize(params)
    flat = lj.tree.flatten(qparams)
    dequantized = {}
    for mod_name, mod in _bnb_model(base_dir).named_modules():
        if type(mod).__name__ != "Linear4bit":  # every linear layer is one; the tied head stays dense
            continue
        _, _, i, *module = mod_name.split(".")  # transformer.h.{i}.attn.c_attn
        q = flat[f"transformer/h/{'/'.join(module)}/kernel" if scan else f"transformer/h/{i}/{'/'.join(module)}/kernel"]
        codes, absmax = (q.codes[int(i)], q.absmax[int(i)]) if scan else (q.codes, q.absmax)
        np.testing.assert_array_equal(np.asarray(codes), mod.weight.data.numpy().reshape(-1), err_msg=mod_name)
        np.testing.assert_array_equal(np.asarray(absmax), mod.weight.quant_state.absmax.numpy(), err_msg=mod_name)
        dequantized[mod_name] = bnb_functional.dequantize_4bit(mod.weight.data, mod.weight.quant_state)  # (out, in)
    assert len(dequantized) == 4 * model.config.num_layers

    def reference():
        ref = _hf_model(base_dir)
        with torch.no_grad():
            for mod_name, w in dequantized.items():
                mod = ref.get_submodule(mod_name)
                mod.weight.copy_(w.T if type(mod).__name__ == "Conv1D" else w)  # Conv1D holds (in, out)
        return ref

    want_base = _logits(reference())
    base = np.asarray(jax.jit(quant.apply(model.apply))(qparams, IDS))
    np.testing.assert_allclose(base, want_base, atol=ATOL, rtol=0)
    assert np.abs(np.asarray(model.apply(params, IDS)) - want_base).max() > 100 * ATOL  # NF4 did round

    # PEFT-made adapter on the NF4 base -> here.
    pm = nudge_torch(peft.get_peft_model(reference(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets)),
                     seed=1)
    pm.save_pretrained(tmp_path / "peft_made")
    got = lp.load_peft(tmp_path / "peft_made", qparams, model_config=model.config)
    g = jax.jit(lj.apply(model.apply, got.config, strict=True))
    np.testing.assert_allclose(np.asarray(g(qparams, got.adapters, IDS)), _logits(pm), atol=ATOL, rtol=0)

    # Trained here on the NF4 base (the weights stay NF4) -> PEFT.
    config = lj.LoraConfig(rank=4, alpha=8, targets=targets)
    apply = lj.apply(model.apply, config)

    def loss_fn(p, a, ids):
        return optax.softmax_cross_entropy_with_integer_labels(apply(p, a, ids)[:, :-1], ids[:, 1:]).mean()

    ts = lj.make_train_step(loss_fn, optax.adam(1e-2))
    trainable, frozen = lj.split(config, qparams, lj.init(config, qparams, jax.random.key(0)))
    opt, step = ts.init(trainable), jax.jit(ts.step)
    for _ in range(3):
        trainable, opt, _ = step(trainable, frozen, opt, IDS)
    qp, adapters = lj.join(trainable, frozen)
    assert all(isinstance(lj.tree.flatten(qp)[p], quant.QuantizedArray) for p in adapters)
    ours = np.asarray(jax.jit(apply)(qp, adapters, IDS))
    assert np.abs(ours - want_base).max() > 100 * ATOL
    out = lp.save_peft(tmp_path / "ours", config, adapters, model_config=model.config)
    np.testing.assert_allclose(_logits(peft.PeftModel.from_pretrained(reference(), str(out)).eval()), ours,
                               atol=ATOL, rtol=0)
    # On transformers' own 4-bit model it loads and applies too; bitsandbytes' CPU forward (bf16
    # absmax) only lets us check it to a few percent of what the adapter changes.
    on_4bit = peft.PeftModel.from_pretrained(_bnb_model(base_dir), str(out)).eval()
    assert np.abs(_logits(on_4bit) - ours).max() < 0.05 * np.abs(want_base - ours).max()
