"""Kernels with several input or output axes (Flax DenseGeneral / LinearGeneral, as in Flax's own
attention modules) adapted as one matrix through `LoraConfig.axes_pattern`."""

from __future__ import annotations

import math
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lora_jax as lj
from lora_jax import checkpoint, multi, peft, quant
from lora_jax.config import FLAX_ATTENTION_AXES
from lora_jax.models import CausalLM, GPT2Config

D, H, DH = 32, 4, 8  # query/key/value kernels [D, H, Dh]; out [H, Dh, D]
X = jax.random.normal(jax.random.key(3), (2, 5, D))
KEY = jax.random.key(0)
GPT = GPT2Config(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                 max_position_embeddings=16, scan_layers=True)
ATTN = lj.LoraConfig(rank=4, alpha=8, targets=["query", "value", "out"], axes_pattern=FLAX_ATTENTION_AXES)


def nudge(adapters, key=jax.random.key(7), scale=0.1):
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def close(a, b, atol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=atol)


@pytest.fixture(scope="module")
def mha():
    m = nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=D)
    return m, m.init(jax.random.key(0), X)


class ScannedAttention(nn.Module):
    """Flax attention blocks under nn.scan: kernels [L, D, H, Dh] and [L, H, Dh, D]."""

    @nn.compact
    def __call__(self, x):
        block = nn.scan(lambda mdl, h, _: (h + nn.MultiHeadDotProductAttention(num_heads=H)(h), None),
                        variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return block(self, x, None)[0]


def test_flax_attention_is_adapted_as_matrices_and_stays_factored(mha):
    m, params = mha
    adapters = lj.init(ATTN, params, jax.random.key(1))
    shapes = jax.tree.map(jnp.shape, adapters)
    # D -> H*Dh and H*Dh -> D maps: what PEFT would adapt on the equivalent torch Linear.
    assert shapes["params/query/kernel"] == {"lora_A": (D, 4), "lora_B": (4, H * DH)}
    assert shapes["params/out/kernel"] == {"lora_A": (H * DH, 4), "lora_B": (4, D)}
    assert lj.summary(ATTN, params, adapters).trainable == 3 * 4 * (D + H * DH)
    lazy = jax.jit(lj.apply(m.apply, ATTN, strict=True))  # strict: any materialised W0 + s*A*B raises
    # B = 0: the plain module's output, to float rounding (XLA 0.11 may fuse the compiled one otherwise)
    np.testing.assert_allclose(lazy(params, adapters, X), m.apply(params, X), rtol=0, atol=1e-6)
    adapters = nudge(adapters)
    merged = lj.apply(m.apply, ATTN, strategy="merged")
    want = merged(params, adapters, X)
    assert float(jnp.abs(want - m.apply(params, X)).max()) > 1e-2
    close(lazy(params, adapters, X), want)
    loss = lambda f: lambda a: jnp.sum(f(params, a, X) ** 2)  # noqa: E731
    close(jax.jit(jax.grad(loss(lj.apply(m.apply, ATTN, strict=True))))(adapters), jax.grad(loss(merged))(adapters),
          atol=1e-4)
    # under jax.checkpoint the reshaped kernels enter the checkpoint factored (strict: nothing materialised)
    remat = jax.checkpoint(m.apply, policy=jax.checkpoint_policies.nothing_saveable)
    close(jax.jit(jax.grad(loss(lj.apply(remat, ATTN, strict=True))))(adapters), jax.grad(loss(merged))(adapters),
          atol=1e-4)
    # merge() folds the reshaped delta into the [D, H, Dh] kernel: the plain module gives the same.
    close(m.apply(lj.merge(ATTN, jax.tree.map(jnp.copy, params), adapters), X), want)
    # The delta at query is the matrix s*A*B laid out as the kernel.
    ab = adapters["params/query/kernel"]
    delta = lj.merge(ATTN, jax.tree.map(jnp.copy, params), adapters)["params"]["query"]["kernel"] - \
        params["params"]["query"]["kernel"]
    close(delta, (2.0 * ab["lora_A"] @ ab["lora_B"]).reshape(D, H, DH))


def test_dropout_dora_and_pissa_on_reshaped_kernels(mha):
    m, params = mha
    adapters = nudge(lj.init(ATTN, params, jax.random.key(1)))
    g = lj.apply(m.apply, ATTN, strict=True)
    a = g(params, adapters, X)
    drop = lj.LoraConfig(**{**ATTN.to_dict(), "dropout": 0.5})
    b = jax.jit(lj.apply(m.apply, drop, strict=True))(params, adapters, X, lora_rng=jax.random.key(0))
    assert float(jnp.abs(a - b).max()) > 1e-3  # dropout reaches the merged input axes
    close(lj.apply(m.apply, drop)(params, adapters, X), a)  # no rng: no dropout

    dora = lj.LoraConfig(**{**ATTN.to_dict(), "use_dora": True})
    da = lj.init(dora, params, jax.random.key(1))
    assert da["params/query/kernel"][lj.MAGNITUDE].shape == (H * DH,)  # one norm per output column of the matrix
    np.testing.assert_allclose(lj.apply(m.apply, dora, strict=True)(params, da, X), m.apply(params, X), atol=1e-5)
    da = nudge(da)
    close(jax.jit(lj.apply(m.apply, dora, strict=True))(params, da, X),
          lj.apply(m.apply, dora, strategy="merged")(params, da, X))

    pissa = lj.LoraConfig(**{**ATTN.to_dict(), "init": "pissa"})
    res, start = lj.init_residual(pissa, params, jax.random.key(2))
    assert res["params"]["query"]["kernel"].shape == (D, H, DH)
    close(lj.apply(m.apply, pissa, strict=True)(res, start, X), m.apply(params, X))  # the model unchanged
    s = np.linalg.svd(np.asarray(params["params"]["query"]["kernel"]).reshape(D, H * DH), compute_uv=False)
    ab = start["params/query/kernel"]
    np.testing.assert_allclose(np.linalg.svd(2.0 * np.asarray(ab["lora_A"] @ ab["lora_B"]), compute_uv=False)[:4],
                               s[:4], rtol=1e-4)  # the principal part of the D x H*Dh matrix


def test_scanned_and_nnx_attention():
    model = ScannedAttention()
    params = model.init(jax.random.key(0), X)
    kernel = params["params"]["MultiHeadDotProductAttention_0"]["query"]["kernel"]
    assert kernel.shape == (3, D, H, DH)
    adapters = nudge(lj.init(ATTN, params, jax.random.key(1)))
    assert adapters["params/MultiHeadDotProductAttention_0/query/kernel"]["lora_A"].shape == (3, D, 4)
    close(jax.jit(lj.apply(model.apply, ATTN, strict=True))(params, adapters, X),
          lj.apply(model.apply, ATTN, strategy="merged")(params, adapters, X))
    drop = lj.LoraConfig(**{**ATTN.to_dict(), "dropout": 0.3})  # one dropout key per stacked layer
    dropped = jax.jit(lj.apply(model.apply, drop, strict=True))(params, adapters, X, lora_rng=KEY)
    undropped = lj.apply(model.apply, drop, strict=True)(params, adapters, X)  # no rng: no dropout
    assert bool(jnp.isfinite(dropped).all()) and float(jnp.abs(dropped - undropped).max()) > 1e-3

    gdef, state = nnx.split(nnx.MultiHeadAttention(num_heads=H, in_features=D, decode=False, rngs=nnx.Rngs(0)))
    f = lambda s, x: nnx.merge(gdef, s)(x)  # noqa: E731
    adapters = nudge(lj.init(ATTN, state, jax.random.key(1)))
    assert jax.tree.map(jnp.shape, adapters)["value/kernel"] == {"lora_A": (D, 4), "lora_B": (4, H * DH)}
    close(jax.jit(lj.apply(f, ATTN, strict=True))(state, adapters, X),
          lj.apply(f, ATTN, strategy="merged")(state, adapters, X))


def test_mixed_batches_hotswap_combine_and_qlora(mha):
    m, params = mha
    cfgs = {"a": ATTN, "b": lj.LoraConfig(rank=2, targets=["query", "key"], axes_pattern=FLAX_ATTENTION_AXES)}
    bank = {n: nudge(lj.init(c, params, jax.random.key(i)), key=jax.random.key(10 + i)) for i, (n, c) in
            enumerate(cfgs.items())}
    mm = multi.multi(m.apply, cfgs)
    rows = mm.mixed(params, bank, X, adapter_ids=mm.ids(["b", None]))
    close(rows[0], lj.apply(m.apply, cfgs["b"])(params, bank["b"], X)[0])
    close(rows[1], m.apply(params, X)[1])

    swap_cfg, same = multi.hotswappable(cfgs, bank)
    assert swap_cfg.axes_for("params/out/kernel") == (2, 1)
    serve = jax.jit(lj.apply(m.apply, swap_cfg, strict=True))
    close(serve(params, same["a"], X), lj.apply(m.apply, cfgs["a"])(params, bank["a"], X))

    both_cfg, both = multi.combine(cfgs, bank, {"a": 0.5, "b": 0.5}, how="linear")
    want = 0.5 * sum(lj.merge(c, jax.tree.map(jnp.copy, params), bank[n])["params"]["query"]["kernel"]
                     for n, c in cfgs.items())
    got = lj.merge(both_cfg, jax.tree.map(jnp.copy, params), both)["params"]["query"]["kernel"]
    close(got, want)

    qparams = quant.quantize(params)  # QLoRA: the NF4 kernel is dequantized where it is viewed as a matrix
    qa = lj.init(ATTN, qparams, jax.random.key(1))
    qa = nudge(qa)
    close(jax.jit(lj.apply(m.apply, ATTN))(qparams, qa, X), lj.apply(m.apply, ATTN, strategy="merged")(qparams, qa, X))


def test_checkpoint_round_trip_keeps_axes(mha, tmp_path):
    m, params = mha
    adapters = nudge(lj.init(ATTN, params, jax.random.key(1)))
    checkpoint.save(tmp_path / "ad", ATTN, adapters, params=params)
    loaded = checkpoint.load(tmp_path / "ad", params)
    config, back = loaded.config, loaded.adapters
    assert config.axes_pattern == ATTN.axes_pattern and config == ATTN
    close(back, adapters)
    # The same adapters under a config without axes_pattern do not fit: named, with both shapes.
    plain = lj.LoraConfig(rank=4, alpha=8, targets=["query", "value", "out"])
    with pytest.raises(ValueError, match=r"params/out/kernel.*lora_A \(32, 4\)"):
        lj.check_adapters(plain, params, adapters)


def test_stack_contraction_warns_or_raises_and_bad_axes_are_named(mha, tmp_path):
    m, params = mha
    plain = lj.LoraConfig(rank=4, targets=["query"])  # [D, H, Dh] taken as D stacked [H, Dh] matrices
    adapters = lj.init(plain, params, jax.random.key(1))
    with pytest.warns(UserWarning, match=r"'params/query/kernel' \(32, 4, 8\) is contracted over dim\(s\) \[0\].*"
                                         r"axes_pattern"):
        lj.apply(m.apply, plain)(params, adapters, X)
    with pytest.raises(lj.FallbackError, match="axes_pattern"):
        lj.apply(m.apply, plain, strict=True)(params, adapters, X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a scanned GPT-2's [L, in, out] stacks are sliced, never contracted
        model = CausalLM(GPT)
        p = model.init_params(jax.random.key(0))
        cfg = lj.LoraConfig(rank=2, targets=["c_attn"])
        lj.apply(model.apply, cfg)(p, lj.init(cfg, p, jax.random.key(1)), jnp.ones((1, 4), jnp.int32))

    for bad in [(1,), (0, 2), (1, "2"), "12", (True, 1)]:
        with pytest.raises(ValueError, match=r"axes_pattern\['q'\] must be \(n_in, n_out\)"):
            lj.LoraConfig(axes_pattern={"q": bad})
    with pytest.raises(ValueError, match=r"'params/query/kernel' 2 input and 2 output axes.*\(32, 4, 8\)"):
        lj.init(lj.LoraConfig(targets=["query"], axes_pattern={".*query": (2, 2)}), params, jax.random.key(0))
    with pytest.raises(ValueError, match=r"rank 40 at 'params/query/kernel'.*\(32, 4, 8\) \(as the matrix stack "
                                         r"\(32, 32\)\)"):  # PiSSA takes r directions of W0: r <= min(in, out)
        lj.init_residual(lj.LoraConfig(rank=40, targets=["query"], axes_pattern=FLAX_ATTENTION_AXES, init="pissa"),
                         params, KEY)
    with pytest.raises(ValueError, match=r"init_loftq: 'params/out/kernel' \(4, 8, 32\).*axes_pattern"):
        lj.init_loftq(ATTN, params)
    adapters = lj.init(ATTN, params, KEY)
    with pytest.raises(ValueError, match="PEFT export: axes_pattern"):
        peft.save_peft(tmp_path / "peft", ATTN, adapters, model_config=GPT)
    assert not (tmp_path / "peft").exists()
    assert math.prod(ATTN.matrix_shape("params/out/kernel", (H, DH, D))) == H * DH * D



class ConvNet(nn.Module):
    """Flax convolutions: strided, dilated, 1x1, a grouped one, and a 1-D one."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3), strides=2, padding="SAME", name="c1")(x)  # kernel [3, 3, 3, 8]
        x = nn.Conv(6, (3, 3), kernel_dilation=2, name="c2")(nn.relu(x))
        x = nn.Conv(4, (1, 1), name="c3")(x)
        x = nn.Conv(4, (2, 2), feature_group_count=2, name="grouped")(x)  # kernel [2, 2, 2, 4]
        return nn.Conv(5, (3,), name="c1d")(x.reshape(x.shape[0], -1, x.shape[-1]))  # kernel [3, 4, 5]


def test_conv_kernels_as_peft_conv_lora():
    m = ConvNet()
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
    params = m.init(jax.random.key(1), x)
    # [kh, kw, in, out] as the matrix [kh*kw*in, out]: A a conv into r channels, B a 1x1 conv.
    cfg = lj.LoraConfig(rank=2, alpha=4, targets=["c1", "c2", "c3", "c1d"],
                        axes_pattern={".*c[0-9]": (3, 1), ".*c1d": (2, 1)})
    adapters = lj.init(cfg, params, KEY)
    assert adapters["params/c1/kernel"]["lora_A"].shape == (27, 2)
    assert adapters["params/c1d/kernel"]["lora_A"].shape == (12, 2)
    lazy = jax.jit(lj.apply(m.apply, cfg, strict=True))  # strict: no convolution materialises W0 + s*A*B
    np.testing.assert_allclose(lazy(params, adapters, x), m.apply(params, x), atol=1e-6)
    adapters = nudge(adapters)
    merged = lj.apply(m.apply, cfg, strategy="merged")
    close(lazy(params, adapters, x), merged(params, adapters, x))
    loss = lambda f: lambda a: jnp.sum(f(params, a, x) ** 2)  # noqa: E731
    close(jax.grad(loss(lj.apply(m.apply, cfg, strict=True)))(adapters), jax.grad(loss(merged))(adapters), atol=1e-4)
    close(m.apply(lj.merge(cfg, jax.tree.map(jnp.copy, params), adapters), x), merged(params, adapters, x))
    drop = lj.LoraConfig(**{**cfg.to_dict(), "dropout": 0.5})
    assert float(jnp.abs(lazy(params, adapters, x) - lj.apply(m.apply, drop, strict=True)(
        params, adapters, x, lora_rng=jax.random.key(5))).max()) > 1e-3

    dora = lj.LoraConfig(**{**cfg.to_dict(), "use_dora": True})  # PEFT's conv DoRA: a norm per output channel
    da = lj.init(dora, params, KEY)
    assert da["params/c2/kernel"][lj.MAGNITUDE].shape == (6,)
    da = nudge(da)
    close(jax.jit(lj.apply(m.apply, dora, strict=True))(params, da, x), lj.apply(m.apply, dora, strategy="merged")(
        params, da, x))

    velora = lj.LoraConfig(**{**cfg.to_dict(), "velora_num_groups": 2})  # as in PEFT: linear layers only
    with pytest.raises(ValueError, match="VeLoRA compresses the input of x @ A for linear layers; 'params/c"):
        lj.apply(m.apply, velora)(params, adapters, x)

    grouped = lj.LoraConfig(rank=2, targets=["grouped"], axes_pattern={".*grouped": (3, 1)})
    ga = nudge(lj.init(grouped, params, KEY))
    close(lj.apply(m.apply, grouped)(params, ga, x), lj.apply(m.apply, grouped, strategy="merged")(params, ga, x))
    with pytest.raises(lj.FallbackError, match="'params/grouped/kernel'"):  # grouped: materialised, correct
        lj.apply(m.apply, grouped, strict=True)(params, ga, x)
    plain = lj.LoraConfig(rank=2, targets=["c1"])  # [3, 3] taken for a stack of [3, 8] matrices
    with pytest.warns(UserWarning, match=r"'params/c1/kernel' \(3, 3, 3, 8\) is contracted over dim\(s\) \[0, 1\]"):
        lj.apply(m.apply, plain)(params, lj.init(plain, params, KEY), x)
