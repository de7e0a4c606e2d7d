"""PiSSA / OLoRA inits (init_residual) and their conversion to plain LoRA (to_plain), pure JAX.
PEFT parity (same residual model, PEFT loading the converted adapter) is in test_peft.py."""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax import checkpoint, multi, quant
from lora_jax import peft as lp
from lora_jax.models import CausalLM, GPT2Config

IDS = np.array([[5, 17, 42, 9, 3, 25, 7, 12], [1, 2, 3, 4, 5, 6, 7, 30]], np.int32)


def _gpt2(scan, dtype=jnp.float32):
    cfg = GPT2Config(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=128,
                     max_position_embeddings=32, scan_layers=scan)
    model = CausalLM(cfg)
    params = model.init_params(jax.random.key(0))
    return model, jax.tree.map(lambda x: x.astype(dtype), params)


def _nudge(adapters, scale=0.05):
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("init,scan,dora,rslora,targets", [
    ("pissa", False, False, False, ["wte", "c_attn", "c_fc"]), ("pissa_niter_2", True, False, True, "all-linear"),
    ("olora", False, True, False, "all-linear"), ("pissa", True, True, True, "all-linear")])
def test_residual_model_starts_as_the_base_and_converts_to_plain_lora(init, scan, dora, rslora, targets):
    """At init, residual weights + adapters compute the base model; after the adapters move,
    to_plain's rank-2r LoRA on the original weights computes what the trained adapters compute
    on the residual, with every scale kept (rank_pattern / alpha_pattern / rsLoRA included).
    A tied embedding (wte) takes the residual in its lookup and in the LM head alike."""
    model, params = _gpt2(scan)
    config = lj.LoraConfig(rank=4, alpha=8, targets=targets, init=init, use_dora=dora, use_rslora=rslora,
                           rank_pattern={".*c_fc": 2}, alpha_pattern={".*attn/c_attn": 3.0})
    params_res, a0 = lj.init_residual(config, params, jax.random.key(1))
    ref = model.apply(params, IDS)
    g = jax.jit(lj.apply(model.apply, config, strict=True))
    np.testing.assert_allclose(g(params_res, a0, IDS), ref, atol=2e-6)
    assert float(jnp.abs(model.apply(params_res, IDS) - ref).max()) > 1e-2  # the residual alone is another model
    for p in a0:  # only targeted leaves change, and they change
        assert not np.allclose(lj.tree.flatten(params_res)[p], lj.tree.flatten(params)[p])
    wpe = "transformer/wpe/embedding"  # not targeted: the same array
    assert lj.tree.flatten(params_res)[wpe] is lj.tree.flatten(params)[wpe]

    trained = _nudge(a0)
    plain_config, plain = lj.to_plain(config, trained, a0)
    assert plain_config.init == "kaiming_uniform" and plain_config.rank == 8
    for p in plain:
        assert plain_config.rank_for(p) == 2 * config.rank_for(p)
        assert plain_config.scale_for(p) == pytest.approx(config.scale_for(p), rel=1e-12)
        assert plain[p]["lora_A"].shape[-1] == 2 * config.rank_for(p)
    want = g(params_res, trained, IDS)
    assert float(jnp.abs(want - ref).max()) > 1e-2
    got = jax.jit(lj.apply(model.apply, plain_config, strict=True))(params, plain, IDS)
    np.testing.assert_allclose(got, want, atol=2e-6)


def test_factors_are_the_principal_part():
    """PiSSA: s*A*B is W0's rank-r truncated SVD, W_res holds the remaining singular values;
    pissa_niter_<n> approaches it; OLoRA: B's rows are orthonormal (Q's first r columns), A = R's
    first r rows, W_res = W0 - s*A*B."""
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    decay = 0.7 ** jnp.arange(24)
    w = (jax.random.orthogonal(k1, 48)[:, :24] * decay) @ jax.random.orthogonal(k2, 24)  # [48, 24], known spectrum
    params = {"dense": {"kernel": w, "bias": jnp.zeros(24)}}
    cfg = lj.LoraConfig(rank=5, alpha=10, targets=["dense"], init="pissa")
    res, ad = lj.init_residual(cfg, params, k3)
    s = cfg.scale_for("dense/kernel")
    u, sv, vh = np.linalg.svd(np.asarray(w, np.float64), full_matrices=False)
    top = (u[:, :5] * sv[:5]) @ vh[:5]
    np.testing.assert_allclose(s * ad["dense/kernel"]["lora_A"] @ ad["dense/kernel"]["lora_B"], top, atol=1e-5)
    np.testing.assert_allclose(np.linalg.svd(np.asarray(res["dense"]["kernel"]), compute_uv=False)[:19], sv[5:],
                               rtol=1e-3, atol=1e-6)
    assert res["dense"]["bias"] is params["dense"]["bias"]

    def lowrank_error(niter):  # power iterations converge geometrically (sigma_6 / sigma_5 = 0.7 here)
        _, got = lj.init_residual(dataclasses.replace(cfg, init=f"pissa_niter_{niter}"), params, k3)
        return float(jnp.abs(s * got["dense/kernel"]["lora_A"] @ got["dense/kernel"]["lora_B"] - top).max())
    errors = [lowrank_error(n) for n in (1, 4, 16)]
    assert errors[0] > 3 * errors[1] > 9 * errors[2] and errors[2] < 1e-5, errors

    olora = dataclasses.replace(cfg, init="olora")
    res_o, ad_o = lj.init_residual(olora, params, k3)
    a, b = ad_o["dense/kernel"]["lora_A"], ad_o["dense/kernel"]["lora_B"]
    np.testing.assert_allclose(b @ b.T, np.eye(5), atol=1e-5)
    q, r = np.linalg.qr(np.asarray(w).T)
    np.testing.assert_allclose(np.abs(a.T), np.abs(r[:5]), atol=1e-5)  # up to the sign of each R row
    np.testing.assert_allclose(res_o["dense"]["kernel"] + s * a @ b, w, atol=1e-6)


def test_bf16_base_and_quantized_residual():
    """A bf16 base keeps its dtype (factors fp32); quantizing the residual after init (QPiSSA)
    leaves the adapted model closer to W0 than NF4 of W0 itself, on a weight with a dominant
    low-rank part."""
    _, params = _gpt2(False, jnp.bfloat16)
    config = lj.LoraConfig(rank=4, alpha=8, targets=["c_attn"], init="pissa")
    res, ad = lj.init_residual(config, params, jax.random.key(1))
    p = "transformer/h/0/attn/c_attn/kernel"
    assert lj.tree.flatten(res)[p].dtype == jnp.bfloat16 and ad[p]["lora_A"].dtype == jnp.float32

    k1, k2 = jax.random.split(jax.random.key(3))
    w = 0.02 * jax.random.normal(k1, (128, 128)) + jax.random.normal(k2, (128, 4)) @ jax.random.normal(k2, (4, 128))
    params = {"proj": {"kernel": w}}
    cfg = lj.LoraConfig(rank=4, alpha=4, targets=["proj"], init="pissa")
    res, ad = lj.init_residual(cfg, params, jax.random.key(0))
    q_res = quant.dequantize(quant.quantize(res, targets=["proj"]))["proj"]["kernel"]
    q_w0 = quant.dequantize(quant.quantize(params, targets=["proj"]))["proj"]["kernel"]
    err_pissa = jnp.linalg.norm(q_res + ad["proj/kernel"]["lora_A"] @ ad["proj/kernel"]["lora_B"] - w)
    assert float(err_pissa) < 0.2 * float(jnp.linalg.norm(q_w0 - w))


def test_errors_name_the_problem(tmp_path):
    _, params = _gpt2(False)
    pissa = lj.LoraConfig(rank=2, targets=["c_attn"], init="pissa")
    with pytest.raises(ValueError, match="init='pissa' .* use lora_jax.init_residual"):
        lj.init(pissa, params, jax.random.key(0))
    with pytest.raises(ValueError, match="unknown init 'pissa_niter_x'"):
        lj.LoraConfig(init="pissa_niter_x")
    q = quant.quantize(params)
    with pytest.raises(ValueError, match="transformer/h/0/attn/c_attn/kernel.* before quant.quantize"):
        lj.init_residual(pissa, q, jax.random.key(0))
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    with pytest.raises(ValueError, match="factors of 'transformer/h/0/attn/c_attn/kernel' from its float values, "
                                         "got ShapeDtypeStruct"):
        lj.init_residual(pissa, shapes, jax.random.key(0))

    res, a0 = lj.init_residual(pissa, params, jax.random.key(0))
    plain = lj.LoraConfig(rank=2, targets=["c_attn"])
    assert lj.init_residual(plain, params, jax.random.key(0))[0] is params
    with pytest.raises(ValueError, match="already act on the original weights"):
        lj.to_plain(plain, a0, a0)
    some = dict(list(a0.items())[:1])
    with pytest.raises(ValueError, match="differ in their paths"):
        lj.to_plain(pissa, a0, some)
    wrong = {p: {**ab, "lora_B": ab["lora_B"][:1]} for p, ab in a0.items()}
    with pytest.raises(ValueError, match=r"lora_B is \(1, 96\) but the initial one is \(2, 96\)"):
        lj.to_plain(pissa, wrong, a0)

    for call in (lambda: multi.multi(lambda p, x: x, {"qa": plain, "pissa": pissa}),
                 lambda: multi.combine({"pissa": pissa}, {"pissa": a0}, {"pissa": 1.0})):
        with pytest.raises(ValueError, match=r"adapters \{'pissa': 'pissa'\} act on residual base weights"):
            call()

    # Files that readers apply to the stock base refuse residual adapters; lora_jax's own
    # checkpoint keeps them (resuming needs them) and warns on load.
    model_config = GPT2Config(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=128,
                              max_position_embeddings=32)
    with pytest.raises(ValueError, match="PEFT export: init='pissa' .* lora_jax.to_plain"):
        lp.save_peft(tmp_path / "peft", pissa, a0, model_config=model_config)
    assert not (tmp_path / "peft").exists()
    checkpoint.save(tmp_path / "ckpt", pissa, a0)
    with pytest.warns(UserWarning, match="act on the residual weights"):
        got = checkpoint.load(tmp_path / "ckpt", res)
    assert got.config == pissa
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain_cfg, plain_ad = lj.to_plain(pissa, a0, a0)
        checkpoint.save(tmp_path / "plain", plain_cfg, plain_ad)
        assert checkpoint.load(tmp_path / "plain", params).config.rank == 4


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_bf16_factors_are_what_the_residual_cancels(init):
    """With bf16 factors on an fp32 base, W_res cancels the stored (rounded) factors, as PEFT's
    LoRA-GA rounds before it subtracts: W_res + s*A0*B0 is W0 to fp32 precision, so the model
    starts as the base and to_plain stays exact, not off by bf16's rounding of the delta."""
    w = jax.random.normal(jax.random.key(0), (32, 24))
    params = {"proj": {"kernel": w}}
    cfg = lj.LoraConfig(rank=4, alpha=8, targets=["proj"], init=init)
    res, a0 = lj.init_residual(cfg, params, jax.random.key(1), dtype=jnp.bfloat16)
    a, b = (a0["proj/kernel"][k] for k in ("lora_A", "lora_B"))
    assert a.dtype == b.dtype == jnp.bfloat16 and res["proj"]["kernel"].dtype == jnp.float32
    s = cfg.scale_for("proj/kernel")
    f32 = lambda x: np.asarray(x, np.float64)  # noqa: E731
    np.testing.assert_allclose(f32(res["proj"]["kernel"]) + s * f32(a) @ f32(b), f32(w), atol=1e-5)


def test_plain_form_above_min_in_out_saves_and_loads(tmp_path):
    """to_plain doubles the rank; past min(in, out) the plain LoRA (random-init kind, which PEFT
    allows at any rank) must still save, load and export, while PiSSA itself needs r <= min."""
    model, params = _gpt2(scan=False)
    config = lj.LoraConfig(rank=20, targets=["c_attn"], init="pissa")  # c_attn [32, 96]: 2r = 40 > 32
    params_res, adapters0 = lj.init_residual(config, params, jax.random.key(1))
    plain_cfg, plain = lj.to_plain(config, _nudge(adapters0), adapters0)
    assert plain_cfg.rank == 40
    want = jax.jit(lj.apply(model.apply, plain_cfg))(params, plain, IDS)
    back = checkpoint.load(checkpoint.save(tmp_path / "a", plain_cfg, plain), params)
    np.testing.assert_array_equal(jax.jit(lj.apply(model.apply, back.config))(params, back.adapters, IDS), want)
    lp.save_peft(tmp_path / "p", plain_cfg, plain, model_config=model.config)
    got = lp.load_peft(tmp_path / "p", params, model_config=model.config)
    np.testing.assert_allclose(jax.jit(lj.apply(model.apply, got.config))(params, got.adapters, IDS), want,
                               atol=1e-5)
    with pytest.raises(ValueError, match=r"rank 40 at 'transformer/h/0/attn/c_attn/kernel' exceeds min.*'pissa'"):
        lj.init_residual(dataclasses.replace(config, rank=40), params, jax.random.key(1))
