"""The lazy LoRA value through JAX's custom-derivative functions (quax has no custom_vjp rule)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj

KEY = jax.random.key(0)
X = jax.random.normal(jax.random.key(1), (4, 8))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def scaled_sin(x, c):
    """A custom-VJP op, as cuDNN attention (jax.nn.dot_product_attention) or a user's kernel is."""
    return jnp.sin(x) * c


scaled_sin.defvjp(lambda x, c: (jnp.sin(x) * c, jnp.cos(x)), lambda c, cos, g: (cos * g * c,))


def _setup():
    params = {"w": jax.random.normal(KEY, (8, 8))}
    config = lj.LoraConfig(rank=2, alpha=4, targets=["w"])
    leaves, treedef = jax.tree.flatten(lj.init(config, params, KEY))
    adapters = jax.tree.unflatten(treedef, [x + 0.3 * jax.random.normal(jax.random.key(i), x.shape)
                                            for i, x in enumerate(leaves)])
    return params, config, adapters


def _close(f, params, config, adapters, strict):
    fac, mer = lj.apply(f, config, strict=strict), lj.apply(f, config, strategy="merged")
    np.testing.assert_allclose(jax.jit(fac)(params, adapters, X), mer(params, adapters, X), rtol=1e-5, atol=1e-5)
    grad = lambda g: jax.grad(lambda a: jnp.sum(g(params, a, X) ** 2))(adapters)  # noqa: E731
    for u, v in zip(jax.tree.leaves(jax.jit(lambda: grad(fac))()), jax.tree.leaves(grad(mer))):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("where", ["activations", "scan_body", "kernel"])
def test_custom_vjp_inside_the_adapted_function(where):
    params, config, adapters = _setup()
    fns = {
        "activations": lambda p, x: scaled_sin(scaled_sin(x, 0.5) @ p["w"], 2.0),  # kernel stays factored
        "scan_body": lambda p, x: jax.lax.scan(lambda h, _: (scaled_sin(h @ p["w"], 0.5), None), x, None, length=2)[0],
        "kernel": lambda p, x: x @ scaled_sin(p["w"], 2.0),  # the kernel itself: W0 + s*A*B materialised
    }
    _close(fns[where], params, config, adapters, strict=where != "kernel")
    if where == "kernel":
        with pytest.raises(lj.FallbackError, match="'w'"):
            jax.jit(lj.apply(fns[where], config, strict=True))(params, adapters, X)


def test_custom_jvp_of_the_kernel_under_grad():
    # jax.nn.relu is a custom_jvp function: its rule must see W0 + s*A*B, not the factors' tangents
    params, config, adapters = _setup()
    f = lambda p, x: x @ jax.nn.relu(p["w"])  # noqa: E731
    _close(f, params, config, adapters, strict=False)
    with pytest.raises(lj.FallbackError, match="'w'"):
        jax.grad(lambda a: lj.apply(f, config, strict=True)(params, a, X).sum())(adapters)


@pytest.mark.parametrize("arch", ["gpt2", "bloom"])
def test_lora_step_through_the_models_cudnn_attention_branch(arch, cudnn_standin):
    """The GPU bf16 path on CPU: the models' attention_impl="cudnn" branch, with cuDNN's kernel
    stood in for by a custom_vjp around XLA attention (as jax's cuDNN attention is one), takes a
    factored LoRA training step equal to the merged strategy's and to XLA attention's; BLOOM's
    ALiBi reaches it folded into 8 more head dims, with no bias tensor."""
    from lora_jax.models import BloomConfig, CausalLM, GPT2Config

    seen = []

    def check(implementation, q, bias, mask):
        if implementation == "xla":
            return
        assert implementation == "cudnn" and mask is None and bias is None and q.dtype == jnp.bfloat16
        seen.append(q.shape[-1])
    cudnn_standin(check)

    kw = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, param_dtype=jnp.bfloat16,
              attention_impl="cudnn")
    cfg = (GPT2Config(intermediate_size=64, max_position_embeddings=16, **kw) if arch == "gpt2"
           else BloomConfig(intermediate_size=128, **kw))
    model = CausalLM(cfg)
    params = model.init_params(KEY)
    seen.clear()  # (init's one-token pass)
    targets = ["c_attn"] if arch == "gpt2" else ["query_key_value"]
    config = lj.LoraConfig(rank=4, alpha=8, targets=targets)
    leaves, treedef = jax.tree.flatten(lj.init(config, params, KEY))
    adapters = jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(jax.random.key(i), x.shape)
                                            for i, x in enumerate(leaves)])
    ids = jax.random.randint(jax.random.key(2), (2, 8), 0, 64)

    def loss_and_grad(strategy, apply=model.apply):
        g = lj.apply(apply, config, strategy=strategy)
        loss = lambda a: jnp.mean(g(params, a, ids).astype(jnp.float32) ** 2)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(adapters)
    (lf, gf), (lm, gm) = loss_and_grad("factored"), loss_and_grad("merged")
    lx, gx = loss_and_grad("factored", CausalLM(cfg.replace(attention_impl="xla")).apply)
    for l2, g2 in ((lm, gm), (lx, gx)):
        np.testing.assert_allclose(lf, l2, rtol=2e-2)
        for u, v in zip(jax.tree.leaves(gf), jax.tree.leaves(g2)):
            np.testing.assert_allclose(np.asarray(u, np.float32), np.asarray(v, np.float32), rtol=0.1, atol=2e-3)
    assert seen and set(seen) == {cfg.head_dim + (8 if arch == "bloom" else 0)}


@pytest.mark.parametrize("pad", [((0, 3), (0, 0)), ((2, 1), (0, 0)), ((0, 0), (1, 2)), ((1, 0), (0, 2))])
def test_padding_the_adapted_kernel_stays_factored(pad):
    """jnp.pad of W0 + s*A*B on its matrix dims (a padded LM-head vocabulary) keeps the factors:
    W0 takes the padding value, the factors zeros, so it runs under strict and equals the merged
    strategy; DoRA's value falls back (its column norms would take in the padding)."""
    params, config, adapters = _setup()
    f = lambda p, x: jnp.pad(x, ((0, 0), pad[0])) @ jnp.pad(p["w"], pad, constant_values=0.5)  # noqa: E731
    _close(f, params, config, adapters, strict=True)
    dora = lj.LoraConfig(rank=2, alpha=4, targets=["w"], use_dora=True)
    a = lj.init(dora, params, KEY)
    with pytest.raises(lj.FallbackError, match="'w'"):
        lj.apply(f, dora, strict=True)(params, a, X)
    np.testing.assert_allclose(lj.apply(f, dora)(params, a, X), lj.apply(f, dora, strategy="merged")(params, a, X),
                               rtol=1e-5, atol=1e-5)
