"""VeLoRA (PEFT's `velora_config`): x @ A whose backward keeps a compressed x.

The gradient of lora_A needs the layer's input x [N, in], which training would otherwise keep
for every adapted matrix until the backward pass. VeLoRA (Miles et al. 2024) keeps instead, per
token, one number per group of in/G features: x's features are split into G groups ("sub-tokens"
of ceil(in/G) features, zero-padded), each projected on one unit vector v, the normalised mean
of all the batch's sub-tokens (PEFT's default `init_type="batch_average"`, recomputed at every
step). The backward pass rebuilds x ~ (x . v) v * scale and takes A's gradient from it; x's own
gradient (g A^T) and everything in the forward pass are exact. So A's gradient is approximate,
and each adapted matrix keeps [N, G] numbers instead of [N, in] for its backward pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _grouped(x: jax.Array, groups: int) -> jax.Array:
    """x [..., in] -> [N, G, ceil(in/G)], the features zero-padded to G groups (PEFT's sub-tokens)."""
    d = x.shape[-1]
    width = -(-d // groups)
    x = jnp.pad(x.reshape(-1, d), ((0, 0), (0, groups * width - d)))
    return x.reshape(-1, groups, width)


def _projection(grouped: jax.Array) -> jax.Array:
    """v [ceil(in/G)] fp32: the unit mean of the sub-tokens [N, G, ceil(in/G)] (all ones if that
    mean is zero, as in PEFT)."""
    mean = grouped.astype(jnp.float32).mean(axis=(0, 1))
    norm = jnp.linalg.norm(mean)
    safe = jnp.where(norm > 0, mean, jnp.ones_like(mean))
    return safe / jnp.linalg.norm(safe)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def velora_matmul(x: jax.Array, a: jax.Array, groups: int, scale: float) -> jax.Array:
    """x [..., in] @ a [in, r], with VeLoRA's compressed backward for `a`."""
    return x @ a


def _fwd(x, a, groups, scale):
    grouped = _grouped(x, groups)  # [N, G, ceil(in/G)], built once for the projection and the compression
    v = _projection(jax.lax.stop_gradient(grouped))
    compressed = jnp.einsum("ngd,d->ng", grouped, v.astype(x.dtype))  # [N, G]: all the backward keeps
    return x @ a, (compressed, v, a)


def _bwd(groups, scale, res, g):
    compressed, v, a = res
    d, r = a.shape
    gx = g @ a.T.astype(g.dtype)  # [..., in], exact
    rebuilt = (compressed.astype(g.dtype)[..., None] * v.astype(g.dtype)).reshape(compressed.shape[0], -1)[:, :d]
    ga = (scale * rebuilt).T @ g.reshape(-1, r)  # [in, r]
    return gx.astype(g.dtype), ga.astype(a.dtype)


velora_matmul.defvjp(_fwd, _bwd)
