"""Inits that start the adapter from W0 itself (PiSSA, OLoRA), and the way back to plain LoRA.

    params_res, adapters0 = init_residual(config, params, key)   # config.init = "pissa"
    ... train adapters on params_res ...
    plain_config, plain = to_plain(config, adapters, adapters0)  # LoRA on the original params

PiSSA puts W0's r principal singular directions into A*B, OLoRA the first r columns of its QR
decomposition; the base keeps the residual W_res = W0 - s*A0*B0, so the model is unchanged at
step 0. Factors and residuals are PEFT's (`init_lora_weights="pissa" | "pissa_niter_<n>" |
"olora"`), in our [in, r] / [r, out] layout. Trained adapters act on W_res: `to_plain` writes
them as a rank-2r LoRA on the original W0 (PEFT's `path_initial_model_for_weight_conversion`),
the form PEFT, `peft.load_adapter` and every stock base model take. An adapted embedding table
gets the same treatment (its lookup and a tied head both see W_res + s*A*B); PEFT instead gives
its Embedding layers the plain init under these options, a difference `to_plain` makes moot.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import tree
from .config import PISSA_NITER, LoraConfig
from .lazy import column_norms
from .lora import (LORA_BIAS, MAGNITUDE, TOKENS, Adapters, adapter_keys, check_not_data_init, init, init_tokens,
                   layer_gate, target_paths)

PyTree = Any


def svd_factors(w: jax.Array, r: int, scale: float) -> tuple[jax.Array, jax.Array]:
    """w [in, out] fp32 -> A [in, r], B [r, out] with s*A*B = w's rank-r truncated SVD (factors
    zero-padded past k = min(in, out): a plain LoRA may have the larger rank)."""
    u, sv, vh = jnp.linalg.svd(w, full_matrices=False)  # [in, k], [k], [k, out]
    root = jnp.sqrt(sv[:r] / scale)
    pad = max(r - sv.shape[0], 0)
    return jnp.pad(u[:, :r] * root, [(0, 0), (0, pad)]), jnp.pad(root[:, None] * vh[:r], [(0, pad), (0, 0)])


def _pissa_lowrank(w: jax.Array, key: jax.Array, r: int, scale: float, niter: int) -> tuple[jax.Array, jax.Array]:
    """`svd_factors` through a randomized SVD, as torch.svd_lowrank(q=r, niter) computes it: a range
    finder with `niter` power iterations (Halko et al. 2011, alg. 4.4), then an exact SVD of r rows."""
    q = jnp.linalg.qr(w @ jax.random.normal(key, (w.shape[1], r), w.dtype))[0]  # [in, r]
    for _ in range(niter):
        q = jnp.linalg.qr(w.T @ q)[0]  # [out, r]
        q = jnp.linalg.qr(w @ q)[0]  # [in, r]
    a, b = svd_factors(q.T @ w, r, scale)  # the exact SVD of w projected on the range: [r, r], [r, out]
    return q @ a, b


def _olora(w: jax.Array, r: int) -> tuple[jax.Array, jax.Array]:
    """PEFT's OLoRA: Q, R = qr(W) of torch's (out, in) weight W = w^T; B = Q[:, :r], A = R[:r]
    (not divided by s, as in PEFT)."""
    q, rr = jnp.linalg.qr(w.T)  # [out, k], [k, in]
    return rr[:r].T, q[:, :r].T  # A [in, r], B [r, out]


def _factors(config: LoraConfig, w: jax.Array, key: jax.Array, r: int, scale: float):
    """(A, B) for one matrix w [in, out] in fp32."""
    niter = PISSA_NITER.fullmatch(config.init)
    if niter:
        return _pissa_lowrank(w, key, r, scale, int(niter.group(1)))
    return svd_factors(w, r, scale) if config.init == "pissa" else _olora(w, r)


def init_residual(config: LoraConfig, params: PyTree, key: jax.Array, *,
                  dtype: Any = jnp.float32) -> tuple[PyTree, Adapters]:
    """(params, adapters) for any `config.init`; with PiSSA / OLoRA, params hold W_res in place of W0.

    Args:
      config: LoRA config; `init` picks the factors ("kaiming_uniform" / "gaussian": the params
        come back as given, with `lora.init`'s adapters).
      params: full-precision params (factors are computed in fp32, the residual is cast back to
        each weight's dtype). Quantize after this call: the residual is what QLoRA should hold.
      key: PRNG key (used by `pissa_niter_<n>`'s random projections and by the plain inits).
      dtype: factor dtype.
    Returns:
      (params with each targeted W0 replaced by W0 - s*A0*B0, adapters {path: {"lora_A", "lora_B"}}
      (+ DoRA's magnitude: the column norms of W_res + s*A0*B0, so DoRA starts as identity too)).
    """
    check_not_data_init(config)
    if not config.changes_base:
        return params, init(config, params, key, dtype=dtype)

    def factors(i: int, path: str, w: jax.Array) -> tuple[jax.Array, jax.Array]:
        r, scale = config.rank_for(path), config.scale_for(path)
        keys = jax.random.split(jax.random.fold_in(key, i), w.shape[0])
        return jax.vmap(lambda m, k: _factors(config, m, k, r, scale))(w, keys)
    return residual_init(config, params, factors, dtype=dtype)


def residual_init(config: LoraConfig, params: PyTree,
                  factors: Callable[[int, str, jax.Array], tuple[jax.Array, jax.Array]], *,
                  dtype: Any = jnp.float32) -> tuple[PyTree, Adapters]:
    """`init_residual` with the factors given: factors(i, path, w [n, in, out] fp32) -> A [n, in, r],
    B [n, r, out] for the i-th target's n stacked matrices; the base keeps W0 - s*A*B."""
    flat = tree.flatten(params)
    adapters: Adapters = {}
    residual: dict[str, jax.Array] = {}
    for i, p in enumerate(target_paths(config, params)):
        w0 = flat[p]
        if tree.is_value(w0):
            raise ValueError(f"init={config.init!r} computes the factors of {p!r} from full-precision values, got "
                             f"{type(w0).__name__}: initialise before quant.quantize (the residual is "
                             "what the 4-bit base should hold)")
        if isinstance(w0, jax.ShapeDtypeStruct) or not jnp.issubdtype(w0.dtype, jnp.floating):
            got = type(w0).__name__ if isinstance(w0, jax.ShapeDtypeStruct) else f"dtype {w0.dtype}"
            raise ValueError(f"init={config.init!r} computes the factors of {p!r} from its float values, got {got}")
        r, scale = config.rank_for(p), config.scale_for(p)
        *stack, d_in, d_out = config.matrix_shape(p, w0.shape)
        w = jnp.asarray(w0, jnp.float32).reshape(-1, d_in, d_out)  # [prod(S), in, out]
        with jax.default_matmul_precision("highest"):  # W_res must cancel s*A0*B0 in fp32, not TF32 / bf16
            a, b = factors(i, p, w)  # [n, in, r], [n, r, out]
            # W_res must cancel the factors as stored (PEFT's LoRA-GA too): round them to `dtype` first
            a, b = (jnp.asarray(x, jnp.float32).astype(dtype).astype(jnp.float32) for x in (a, b))
            gate = layer_gate(config, p, w0.shape)
            if gate is not None:  # layers left out keep W0 and zero factors
                g = jnp.asarray(gate.reshape(-1, 1, 1), jnp.float32)
                a, b = a * g, b * g
            delta = scale * (a @ b)  # [n, in, out]
        res = (w - delta).astype(w0.dtype)
        adapters[p] = {"lora_A": a.reshape(*stack, d_in, r).astype(dtype),
                       "lora_B": b.reshape(*stack, r, d_out).astype(dtype)}
        if config.lora_bias:
            adapters[p][LORA_BIAS] = jnp.zeros((*stack, d_out), dtype)
        if config.use_dora:  # PEFT: the norm of the (cast) residual base plus the initial delta
            w_init = res.astype(jnp.float32) + delta
            adapters[p][MAGNITUDE] = column_norms(w_init).reshape(*stack, d_out).astype(dtype)
        residual[p] = res.reshape(w0.shape)
    adapters |= init_tokens(config, params, dtype=dtype)  # trainable rows: the original ones, as with plain LoRA
    return tree.map_with_path(lambda p, x: residual.get(p, x), params), adapters


def per_matrix(fn: Callable[[str, int, np.ndarray], tuple[np.ndarray, np.ndarray]]
               ) -> Callable[[int, str, jax.Array], tuple[np.ndarray, np.ndarray]]:
    """`residual_init`'s factors from fn(path, j, w_j [in, out] float64) -> (A [in, r], B [r, out])
    for the j-th matrix of a stack (the data inits, which work matrix by matrix on the host)."""
    def factors(_i: int, path: str, w: jax.Array) -> tuple[np.ndarray, np.ndarray]:
        ab = [fn(path, j, np.asarray(m, np.float64)) for j, m in enumerate(w)]
        return np.stack([a for a, _ in ab]), np.stack([b for _, b in ab])
    return factors


def to_plain(config: LoraConfig, adapters: Adapters, initial: Adapters) -> tuple[LoraConfig, Adapters]:
    """PiSSA / OLoRA adapters as plain LoRA on the original weights W0 (rank 2r, same scale).

    W_res + s*A*B = W0 + s*(A*B - A0*B0) = W0 + s*[A | A0]*[B; -B0]: PEFT's conversion, tensor for
    tensor. DoRA's magnitude carries over unchanged (the adapted weight is the same matrix). Exact
    when W_res was kept in fp32; a bf16 or 4-bit residual adds its rounding to the difference.

    Args:
      config: the config the adapters were trained with (`config.changes_base`).
      adapters: the trained adapters; initial: `init_residual`'s adapters, before training.
    Returns:
      (config with rank, rank_pattern doubled, alpha / alpha_pattern scaled to keep every scale
      (x2, or x sqrt(2) with rsLoRA), init "kaiming_uniform"; the rank-2r adapters).
    """
    if not config.changes_base:
        raise ValueError("to_plain converts adapters trained on residual weights (PiSSA / OLoRA / CorDA / LoRA-GA); "
                         f"init={config.init!r} adapters already act on the original weights")
    if set(adapters) != set(initial):
        diff = sorted(set(adapters) ^ set(initial))
        raise ValueError(f"to_plain: adapters and initial adapters differ in their paths, e.g. {diff[:3]}")
    for p in adapters:
        if set(adapters[p]) == set(initial[p]) == {TOKENS}:
            continue  # trained embedding rows replace the table's, base or residual alike: kept as they are
        if set(adapters[p]) != set(adapter_keys(config)) or not {"lora_A", "lora_B"} <= set(initial[p]):
            raise ValueError(f"to_plain: adapter at {p!r} holds {sorted(adapters[p])} (initial: {sorted(initial[p])}), "
                             f"expected {list(adapter_keys(config))}")
        for k in ("lora_A", "lora_B"):
            got, want = tuple(adapters[p][k].shape), tuple(initial[p][k].shape)
            if got != want:
                raise ValueError(f"to_plain: {p!r} {k} is {got} but the initial one is {want}")
    f = math.sqrt(2.0) if config.use_rslora else 2.0  # scale = alpha / r or alpha / sqrt(r), r doubled
    plain = dataclasses.replace(
        config, init="kaiming_uniform", rank=2 * config.rank, alpha=config.alpha * f,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: v * f for k, v in config.alpha_pattern.items()})
    out: Adapters = {}
    for p, ab in adapters.items():
        if TOKENS in ab:
            out[p] = dict(ab)
            continue
        a0, b0 = initial[p]["lora_A"], initial[p]["lora_B"]
        out[p] = {"lora_A": jnp.concatenate([ab["lora_A"], a0.astype(ab["lora_A"].dtype)], axis=-1),  # [*S, in, 2r]
                  "lora_B": jnp.concatenate([ab["lora_B"], -b0.astype(ab["lora_B"].dtype)], axis=-2)}  # [*S, 2r, out]
        out[p].update({k: v for k, v in ab.items() if k not in ("lora_A", "lora_B")})  # DoRA's magnitude
        assert math.isclose(plain.scale_for(p), config.scale_for(p), rel_tol=1e-9), p
    return plain, out


def check_plain(config: LoraConfig, what: str) -> None:
    """Refuse to write `config` where readers will put the adapters on the original weights."""
    if config.changes_base:
        raise ValueError(f"{what}: init={config.init!r} adapters act on the residual weights init_residual "
                         "returned, not on the base model's; convert them first with "
                         "lora_jax.to_plain(config, adapters, initial_adapters)")

