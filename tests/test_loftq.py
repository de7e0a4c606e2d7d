"""LoftQ (init_loftq): the NF4 base and LoRA factors chosen together; pure JAX (PEFT's LoftQ runs on
CUDA only, so the checks are the algorithm's own: the first iteration is QLoRA's codes plus the
SVD of their error, the error falls with iterations, the dequantized base re-quantizes to the
same codes, unrolled and scanned, DoRA, errors)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax import quant
from lora_jax.models import CausalLM, GPT2Config

IDS = np.array([[5, 17, 42, 9, 3, 25, 7, 12], [1, 2, 3, 4, 5, 6, 7, 30]], np.int32)
TARGETS = ["c_attn", "c_fc"]


def _gpt2(scan=False):
    cfg = GPT2Config(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256,
                     max_position_embeddings=32, scan_layers=scan)
    model = CausalLM(cfg)
    # trained weights are far from HF's N(0, 0.02) init: scale the matrices up so NF4's error matters
    params = jax.tree.map(lambda x: x * 10 if x.ndim >= 2 else x, model.init_params(jax.random.key(0)))
    return model, params


def _err(config, qparams, adapters, params, p):
    w = lj.tree.flatten(params)[p]
    approx = lj.tree.flatten(qparams)[p].materialise() + config.scale_for(p) * (
        adapters[p]["lora_A"] @ adapters[p]["lora_B"])
    return float(jnp.linalg.norm(approx - w))


def test_first_iteration_is_qlora_plus_the_svd_of_its_error():
    _, params = _gpt2()
    config = lj.LoraConfig(rank=8, alpha=32, targets=TARGETS)  # scale 4: the factors carry it
    qparams, adapters = lj.init_loftq(config, params)
    plain = quant.quantize(params)
    flat, fq, fp = lj.tree.flatten(params), lj.tree.flatten(qparams), lj.tree.flatten(plain)
    assert set(adapters) == set(lj.target_paths(config, params)) and len(adapters) == 4
    for p, x in fp.items():  # every linear weight NF4, with QLoRA's codes at the first iteration
        if isinstance(x, quant.QuantizedArray):
            np.testing.assert_array_equal(fq[p].codes, x.codes)
            np.testing.assert_array_equal(fq[p].absmax, x.absmax)
        else:
            assert fq[p] is x
    for p, ab in adapters.items():
        err = np.asarray(flat[p], np.float64) - np.asarray(fp[p].materialise(), np.float64)
        u, s, vh = np.linalg.svd(err)
        best = (u[:, :8] * s[:8]) @ vh[:8]
        np.testing.assert_allclose(4 * np.asarray(ab["lora_A"] @ ab["lora_B"]), best, atol=1e-4)
        assert _err(config, qparams, adapters, params, p) < 0.9 * float(np.linalg.norm(err))


def test_more_iterations_fit_better_and_the_base_reloads_exactly():
    model, params = _gpt2()
    config = lj.LoraConfig(rank=8, alpha=16, targets=TARGETS)
    runs = {n: lj.init_loftq(config, params, iters=n) for n in (1, 5)}
    for p in runs[1][1]:
        assert _err(config, *runs[5], params, p) < _err(config, *runs[1], params, p)
    qparams, adapters = runs[5]
    # a checkpoint of the dequantized base gives back the same codes (PEFT's LoftQ workflow)
    again = quant.quantize(quant.dequantize(qparams))
    for p, x in lj.tree.flatten(qparams).items():
        if isinstance(x, quant.QuantizedArray):
            np.testing.assert_array_equal(lj.tree.flatten(again)[p].codes, x.codes)
    # the LoftQ model is closer to the full-precision one than QLoRA's at step 0 (random weights have a
    # flat spectrum, so a rank-16 fit of each error takes only part of it)
    every = lj.LoraConfig(rank=16, alpha=32, targets="all-linear")
    full = model.apply(params, IDS)
    loftq = lj.apply(model.apply, every)(*lj.init_loftq(every, params, iters=3), IDS)
    qlora = quant.apply(model.apply)(quant.quantize(params), IDS)
    assert float(jnp.abs(loftq - full).mean()) < 0.8 * float(jnp.abs(qlora - full).mean())


def test_scanned_stack_double_quant_and_dora():
    model, params = _gpt2(scan=True)
    config = lj.LoraConfig(rank=4, alpha=8, targets=TARGETS, use_dora=True)
    qparams, adapters = lj.init_loftq(config, params, iters=2, double_quant=True)
    p = "transformer/h/attn/c_attn/kernel"
    assert adapters[p]["lora_A"].shape == (2, 64, 4) and lj.tree.flatten(qparams)[p].absmax2 is not None
    w = lj.tree.flatten(qparams)[p].materialise() + 2 * adapters[p]["lora_A"] @ adapters[p]["lora_B"]
    np.testing.assert_allclose(adapters[p][lj.MAGNITUDE], jnp.linalg.norm(w, axis=-2), rtol=1e-5)
    # DoRA at its initial magnitude computes deq(Q) + s*A*B: the plain LoRA on the dequantized base
    no_dora = lj.LoraConfig(rank=4, alpha=8, targets=TARGETS)
    plain = {q: {k: ab[k] for k in ("lora_A", "lora_B")} for q, ab in adapters.items()}
    want = lj.apply(model.apply, no_dora)(quant.dequantize(qparams), plain, IDS)
    got = lj.apply(model.apply, config)(qparams, adapters, IDS)
    np.testing.assert_allclose(got, want, atol=2e-4)


def test_errors():
    _, params = _gpt2()
    with pytest.raises(ValueError, match="use a plain config"):
        lj.init_loftq(lj.LoraConfig(targets=TARGETS, init="pissa"), params)
    with pytest.raises(ValueError, match="iters must be a positive integer"):
        lj.init_loftq(lj.LoraConfig(targets=TARGETS), params, iters=0)
    with pytest.raises(ValueError, match="'transformer/wte/embedding' is a 'embedding' leaf"):
        lj.init_loftq(lj.LoraConfig(targets=["wte"]), params)
    with pytest.raises(ValueError, match="is QuantizedArray; LoftQ quantizes full-precision"):
        lj.init_loftq(lj.LoraConfig(targets=TARGETS), quant.quantize(params))
