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
