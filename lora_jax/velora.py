"""VeLoRA (PEFT's `velora_config`): x @ A whose backward keeps a compressed x.

The gradient of lora_A needs the layer's input x [N, in], which training would otherwise keep
for every adapted matrix until the backward pass. VeLoRA (Miles et al. 2024) keeps instead, per
token, one number per group of in/G features: x's features are split into G groups ("sub-tokens"
of ceil(in/G) features, zero-padded), each projected on one unit vector v, the normalised mean
of all the batch's sub-tokens (PEFT's default `init_type="batch_average"`, recomputed at every
step). The backward pass rebuilds x ~ (x . v) v * scale and takes A's gradient from it; x's own
gradient (g A^T) and everything in the forward pass are exact. So A's gradient is approximate,
and each adapted matrix keeps [N, G] numbers instead of [N, in] for its backward pass.

PEFT's other `init_type`s fix v instead: "random" (a random unit vector drawn at init) and
"batch_average_once" (the first training batch's mean, `init_once`). That v is the adapter leaf
`lora_velora_embed` [ceil(in/G)]; it gets a zero gradient and is used normalised, so an optimizer
that sees it (weight decay included) never turns it. A v still all zero (a "batch_average_once"
adapter before `init_once`) acts as "batch_average".
"""

from __future__ import annotations

import functools

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax


def _grouped(x: jax.Array, groups: int) -> jax.Array:
    """x [..., in] -> [N, G, ceil(in/G)], the features zero-padded to G groups (PEFT's sub-tokens)."""
    d = x.shape[-1]
    w = width(d, groups)
    x = jnp.pad(x.reshape(-1, d), ((0, 0), (0, groups * w - d)))
    return x.reshape(-1, groups, w)


def unit(v: jax.Array) -> jax.Array:
    """v / ||v|| in fp32; all ones (normalised) for a zero v, as PEFT's `_normalize_projection`."""
    v = v.astype(jnp.float32)
    norm = jnp.linalg.norm(v, axis=-1, keepdims=True)
    safe = jnp.where(norm > 0, v, jnp.ones_like(v))
    return safe / jnp.linalg.norm(safe, axis=-1, keepdims=True)


def _projection(grouped: jax.Array) -> jax.Array:
    """v [ceil(in/G)] fp32: the unit mean of the sub-tokens [N, G, ceil(in/G)] (all ones if that
    mean is zero, as in PEFT)."""
    return unit(grouped.astype(jnp.float32).mean(axis=(0, 1)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def velora_matmul(x: jax.Array, a: jax.Array, v: jax.Array | None, groups: int, scale: float) -> jax.Array:
    """x [..., in] @ a [in, r], with VeLoRA's compressed backward for `a`: along the fixed
    projection v [ceil(in/G)] (its gradient zero), or the batch's mean when v is None or zero."""
    return x @ a


def _fwd(x, a, v, groups, scale):
    grouped = _grouped(x, groups)  # [N, G, ceil(in/G)], built once for the projection and the compression
    batch = lambda: _projection(lax.stop_gradient(grouped))  # noqa: E731
    if v is None:
        proj = batch()
    else:  # a zero v (batch_average_once not yet set) stands for the batch's mean; the mean runs only then
        proj = lax.cond(jnp.any(v != 0), lambda: unit(lax.stop_gradient(v)), batch)
    compressed = jnp.einsum("ngd,d->ng", grouped, proj.astype(x.dtype))  # [N, G]: all the backward keeps
    return x @ a, (compressed, proj, a, None if v is None else jnp.zeros_like(v))


def _bwd(groups, scale, res, g):
    compressed, proj, a, zero_v = res
    d, r = a.shape
    gx = g @ a.T.astype(g.dtype)  # [..., in], exact
    rebuilt = (compressed.astype(g.dtype)[..., None] * proj.astype(g.dtype)).reshape(compressed.shape[0], -1)[:, :d]
    ga = (scale * rebuilt).T @ g.reshape(-1, r)  # [in, r]
    return gx.astype(g.dtype), ga.astype(a.dtype), zero_v


velora_matmul.defvjp(_fwd, _bwd)

EMBED = "lora_velora_embed"  # the fixed projection [*S, ceil(in/G)] of init_type random / batch_average_once
FIXED = ("random", "batch_average_once")  # PEFT's init_types that keep v fixed (the default recomputes it)


def width(d_in: int, groups: int) -> int:
    """The sub-token width ceil(in/G), v's length."""
    return -(-d_in // groups)


def init_once(config: Any, params: Any, f: Callable[[Any, Any], Any], batch: Any, adapters: dict) -> dict:
    """PEFT's init_type="batch_average_once": each adapted matrix's fixed projection from one batch,
    the first training batch (PEFT sets it in the first training forward pass): the unit mean of
    that batch's sub-tokens of the matrix's input.

    Args:
      config: a LoraConfig with velora_init_type="batch_average_once".
      params, f, batch: `f(params, batch)` runs the model (as for `inputs.layer_inputs`).
      adapters: `init`'s (or a loaded) adapters, whose `lora_velora_embed` this replaces.
    Returns:
      the adapters with every `lora_velora_embed` set.
    """
    from .inputs import layer_inputs  # (inputs builds on lazy, which builds on this module)

    if config.velora_num_groups is None or config.velora_init_type != "batch_average_once":
        raise ValueError(f"init_once sets VeLoRA's batch_average_once projection; this config has velora_init_type="
                         f"{config.velora_init_type!r} (velora_num_groups={config.velora_num_groups})")
    moments = layer_inputs(config, params, f, [batch])
    groups, out = config.velora_num_groups, dict(adapters)
    for p, ab in adapters.items():
        if EMBED not in ab:
            continue
        if ab[EMBED].ndim != 1 or (p, 0) not in moments:
            raise ValueError(f"init_once: {p!r} is " + ("a stack of matrices, which VeLoRA does not take"
                             if ab[EMBED].ndim != 1 else "not used as x @ W in f(params, batch)"))
        m = moments[(p, 0)]
        mean = jnp.asarray(m.total / max(m.count, 1.0), jnp.float32)  # [in]: the rows' mean
        # the unit mean of its sub-tokens is that of all the batch's sub-tokens
        out[p] = {**ab, EMBED: _projection(_grouped(mean[None], groups)).astype(ab[EMBED].dtype)}
    return out
