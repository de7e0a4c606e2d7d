"""KaSA, Knowledge-aware Singular-value Adaptation (Wang et al. 2024; PEFT's `kasa_config`).

    params_k, adapters = init_kasa(config, params, key)      # config.use_kasa = True
    loss = task_loss + kasa_loss(config, adapters)            # the paper's regulariser
    ... train the adapters on params_k ...

Each adapted W0 [in, out] is replaced by its rank-(k - r) SVD approximation (k = min(in, out)):
its r smallest singular components, the "noisy, long-tail" knowledge, are dropped, and the
update s * A diag(d) B relearns in their place, with d an r-vector of trained singular values
(`lora_diag`, random at init; B = 0, so training starts from the truncated base). The truncation
is a pure function of W0 and r (`kasa_base`), which is why PEFT files carry no base weights: a
KaSA adapter, saved by lora_jax or PEFT, is put back on `kasa_base(config, params)` of the
original base, as PEFT re-truncates when it loads one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from . import tree
from .config import LoraConfig
from .lora import KASA_DIAG, Adapters, init, orth_norms, target_paths

PyTree = Any
# What loading a KaSA adapter warns (after the source's path): the base it needs is not the stock one.
BASE_WARNING = ("KaSA adapters act on the truncated base weights: apply them to lora_jax.kasa_base(config, params), "
                "as PEFT truncates the base when it loads them")


def _check(config: LoraConfig, what: str) -> None:
    if not config.use_kasa:
        raise ValueError(f"{what}: the config is not KaSA (use_kasa=False)")


def truncate(w: jax.Array, r: int) -> jax.Array:
    """w [in, out] without its r smallest singular components: U[:, :k-r] S[:k-r] Vh[:k-r] (fp32)."""
    u, sv, vh = jnp.linalg.svd(w, full_matrices=False)  # [in, k], [k], [k, out]
    keep = sv.shape[0] - r
    return (u[:, :keep] * sv[:keep]) @ vh[:keep]


def kasa_base(config: LoraConfig, params: PyTree) -> PyTree:
    """params with every KaSA-adapted weight truncated (computed in fp32, cast back to its dtype).

    Deterministic, so it rebuilds the base a saved KaSA adapter was trained on. Full-precision
    weights only: truncate before `quant.quantize`.
    """
    _check(config, "kasa_base")
    flat = tree.flatten(params)
    out = {}
    for p in target_paths(config, params):
        w0 = flat[p]
        if tree.is_value(w0) or isinstance(w0, jax.ShapeDtypeStruct) or not jnp.issubdtype(w0.dtype, jnp.floating):
            got = f"dtype {w0.dtype}" if isinstance(w0, jax.Array) else type(w0).__name__
            raise ValueError(f"KaSA truncates the singular values of {p!r}, which needs its full-precision values; "
                             f"got {got} (truncate before quant.quantize)")
        *_, d_in, d_out = config.matrix_shape(p, w0.shape)
        w = jnp.asarray(w0, jnp.float32).reshape(-1, d_in, d_out)  # [prod(S), in, out]
        with jax.default_matmul_precision("highest"):  # the kept components in fp32, not TF32 / bf16
            kept = jax.vmap(truncate, in_axes=(0, None))(w, config.rank_for(p))
        out[p] = kept.reshape(w0.shape).astype(w0.dtype)
    return tree.map_with_path(lambda p, x: out.get(p, x), params)


def init_kasa(config: LoraConfig, params: PyTree, key: jax.Array, *,
              dtype: Any = jnp.float32) -> tuple[PyTree, Adapters]:
    """(truncated params, adapters) to start KaSA training, as PEFT initialises it.

    Args:
      config: a `use_kasa` config (its `init` draws A; B = 0).
      params: the full-precision base.
      key: PRNG key for A and the diagonal (PEFT: torch.randn(r)).
      dtype: adapter dtype.
    Returns:
      (`kasa_base(config, params)`, {path: {"lora_A": [*S, in, r], "lora_B": [*S, r, out],
      "lora_diag": [*S, r]}}), plus trained rows for `trainable_tokens`.
    """
    _check(config, "init_kasa")
    base = kasa_base(config, params)  # first: it refuses what KaSA cannot adapt
    key_ab, key_d = jax.random.split(key)
    adapters = init(dataclasses.replace(config, use_kasa=False), params, key_ab, dtype=dtype)
    for i, p in enumerate(sorted(p for p, ab in adapters.items() if "lora_A" in ab)):
        a = adapters[p]["lora_A"]
        adapters[p][KASA_DIAG] = jax.random.normal(jax.random.fold_in(key_d, i), a.shape[:-2] + a.shape[-1:], dtype)
    return base, adapters


def kasa_loss(config: LoraConfig, adapters: Adapters) -> jax.Array:
    """KaSA's regulariser (the paper's eqs. 9-11; PEFT's `_get_kasa_loss`), summed over the adapted
    matrices (each layer of a stack counts as one): kasa_beta * sum(d^2) + kasa_gamma *
    (||B B^T - I||_F + ||A^T A - I||_F), in fp32. Add it to the (mean) task loss; it is jittable."""
    _check(config, "kasa_loss")
    total = jnp.float32(0.0)
    for p, ab in sorted(adapters.items()):
        if KASA_DIAG not in ab:
            continue
        f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
        d = f32(ab[KASA_DIAG])  # [*S, r]
        orth_a, orth_b = orth_norms(ab["lora_A"], ab["lora_B"])  # [*S] each
        total = total + config.kasa_beta * jnp.sum(d * d) + config.kasa_gamma * jnp.sum(orth_b + orth_a)
    return total
