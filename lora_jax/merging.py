"""PEFT's model-merging rules (`peft.utils.merge_utils`) for combining adapters: task arithmetic,
TIES, DARE and magnitude pruning over tensors stacked [N, *S, m, n] (N adapters, S layer-stack
dims), and the truncated SVD that turns a merged weight delta back into LoRA factors, as
`add_weighted_adapter(combination_type=...)` computes them.

Pruning keeps a `density` fraction of each adapter's [m, n] matrix (per layer of a stack, as
PEFT prunes each layer's tensor): the largest magnitudes (TIES, magnitude_prune) or a random
subset rescaled by 1 / density (DARE). TIES then keeps, per entry, only the adapters whose sign
agrees with the majority and averages them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MERGES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")  # "linear" = task arithmetic
SIGN_METHODS = ("total", "frequency")


def magnitude_prune_each(t: jax.Array, density: float) -> jax.Array:
    """Zero all but the int(density * m * n) largest-magnitude entries of every [m, n] matrix of t
    [..., m, n] (PEFT `magnitude_based_pruning`; density >= 1 keeps everything, as PEFT does)."""
    if density >= 1:
        return t
    flat = t.reshape(*t.shape[:-2], -1)  # [..., m * n]
    k = int(density * flat.shape[-1])
    _, idx = jax.lax.top_k(jnp.abs(flat), k)  # [..., k]
    mask = jnp.put_along_axis(jnp.zeros_like(flat), idx, 1, axis=-1, inplace=False)
    return (flat * mask).reshape(t.shape)


def random_prune_each(t: jax.Array, density: float, key: jax.Array) -> jax.Array:
    """DARE: keep each entry with probability `density` and rescale by 1 / density (PEFT
    `random_pruning(rescale=True)`; density >= 1 keeps everything)."""
    if density >= 1:
        return t
    keep = jax.random.bernoulli(key, density, t.shape)
    return jnp.where(keep, t / density, 0).astype(t.dtype)


def _weighted(t: jax.Array, w: jax.Array) -> jax.Array:
    return t * w.reshape(w.shape + (1,) * (t.ndim - 1)).astype(t.dtype)  # w [N] over t [N, ...]


def merge(kind: str, t: jax.Array, w: jax.Array, *, density: float | None = None, majority_sign: str = "total",
          key: jax.Array | None = None) -> jax.Array:
    """Merge N task tensors t [N, ..., m, n] with weights w [N] into one [..., m, n].

    kind: `linear` (sum_n w_n t_n), `magnitude_prune` (the same after magnitude pruning),
    `ties` (magnitude pruning, then the majority-sign disjoint mean), `dare_linear` / `dare_ties`
    (random pruning instead; need `key`).
    """
    if kind not in MERGES:
        raise ValueError(f"unknown merge {kind!r}; expected one of {MERGES}")
    if kind == "linear":
        return _weighted(t, w).sum(0)
    if kind.startswith("dare"):
        t = random_prune_each(t, density, key)
    else:
        t = magnitude_prune_each(t, density)
    if kind in ("dare_linear", "magnitude_prune"):
        return _weighted(t, w).sum(0)
    sign = jnp.sign(t)  # ties / dare_ties: keep the entries whose sign agrees with the majority
    votes = t.sum(0) if majority_sign == "total" else sign.sum(0)
    agree = sign == jnp.where(votes >= 0, 1, -1)
    kept = jnp.where(agree, _weighted(t, w), 0).sum(0)
    return kept / jnp.maximum(agree.sum(0), 1).astype(t.dtype)


def truncated_svd(delta: jax.Array, rank: int, clamp: float | None = None) -> tuple[jax.Array, jax.Array]:
    """LoRA factors (A [*S, in, r], B [*S, r, out]) with A.B the best rank-r approximation of
    delta [*S, in, out], scale 1: PEFT's B = U_r S_r, A = V_r^T of the torch-orientation
    delta [out, in]; `clamp` (a quantile in [0, 1]) clips both to +-that quantile of their
    entries, per matrix, as PEFT's `svd_clamp`."""
    m = jnp.swapaxes(delta, -1, -2).astype(jnp.float32)  # [*S, out, in]: PEFT's orientation
    u, s, vh = jnp.linalg.svd(m, full_matrices=False)
    b = u[..., :, :rank] * s[..., None, :rank]  # [*S, out, r]
    a = vh[..., :rank, :]  # [*S, r, in]
    if clamp is not None:
        dist = jnp.concatenate([b.reshape(*b.shape[:-2], -1), a.reshape(*a.shape[:-2], -1)], -1)
        hi = jnp.quantile(dist, clamp, axis=-1)[..., None, None]
        b, a = jnp.clip(b, -hi, hi), jnp.clip(a, -hi, hi)
    return jnp.swapaxes(a, -1, -2).astype(delta.dtype), jnp.swapaxes(b, -1, -2).astype(delta.dtype)
