"""Intruder-dimension mitigation for trained adapters (PEFT's `reduce_intruder_dimension`).

    mitigated, found = reduce_intruders(config, params, adapters)   # found: {path: [*S] counts}

LoRA fine-tuning adds singular directions to a weight that are nearly orthogonal to all of the
base weight's ("intruder dimensions", Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An
Illusion of Equivalence"); damping them recovers part of what the base model knew, at some cost
in task accuracy. Per adapted matrix, as PEFT does: the top `top_k` output-space singular
vectors of W0 + s*A*B whose largest |cosine| with W0's are below `threshold_epsilon` are the
intruders; W0 + s*A*B - (1 - mitigation_lambda) * (their part of the SVD) minus W0, divided by
s, is refactored into rank-r A, B by a truncated SVD with sqrt(S) on each side. Matrices
without intruders keep their factors unchanged.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import tree
from .config import LoraConfig
from .lazy import dense
from .lora import MAGNITUDE, TOKENS, Adapters, check_adapters
from .residual import svd_factors

PyTree = Any


@functools.partial(jax.jit, static_argnames=("top_k",))
def _mitigate(w: jax.Array, a: jax.Array, b: jax.Array, scale: float, *, top_k: int, threshold: float,
              keep: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One matrix: w [in, out], a [in, r], b [r, out] (fp32) -> (new a, new b, number of intruders)."""
    merged = w + scale * (a @ b)
    _, _, vh_base = jnp.linalg.svd(w, full_matrices=False)  # rows: W0's output-space singular vectors
    u, s, vh = jnp.linalg.svd(merged, full_matrices=False)  # [in, k], [k], [k, out]
    k = min(top_k, s.shape[0])
    cos = jnp.max(jnp.abs(vh[:k] @ vh_base.T), axis=1)  # [k]: best match of each top direction in W0
    intruder = cos < threshold
    part = (u[:, :k] * jnp.where(intruder, s[:k], 0.0)) @ vh[:k]  # [in, out]: the intruders' share of merged
    delta = (merged - (1.0 - keep) * part - w) / scale
    new_a, new_b = svd_factors(delta, a.shape[1], 1.0)  # rank r again, sqrt(S) on either side
    any_found = jnp.any(intruder)
    return jnp.where(any_found, new_a, a), jnp.where(any_found, new_b, b), jnp.sum(intruder)


def reduce_intruders(config: LoraConfig, params: PyTree, adapters: Adapters, *, top_k: int = 10,
                     threshold_epsilon: float = 0.5, mitigation_lambda: float = 0.75
                     ) -> tuple[Adapters, dict[str, np.ndarray]]:
    """Adapters with their intruder dimensions damped (PEFT's `reduce_intruder_dimension`).

    Args:
      config: the adapters' config; params: the base they were trained on (a PiSSA/CorDA residual
        base or an NF4 one as it is: W0 is what the adapters act on).
      adapters: trained adapters; lora_B biases, trainable token rows and the like are returned
        unchanged, only lora_A / lora_B change. Not for DoRA (the magnitude was trained for the
        directions this changes).
      top_k: how many of the merged weight's leading singular directions are examined.
      threshold_epsilon: a direction whose largest |cosine| with W0's is below this is an intruder.
      mitigation_lambda: the share of each intruder's singular value kept (1: unchanged).
    Returns:
      (adapters of the same ranks, shapes and dtypes; {path: number of intruders per matrix,
      shaped like the layer stack ([] for a plain matrix)}).
    """
    if config.use_dora:
        raise ValueError("reduce_intruders: DoRA adapters are not supported (their trained magnitude "
                         f"{MAGNITUDE!r} belongs to the directions this would change)")
    if config.use_kasa or config.adalora is not None:
        kind, leaf = ("KaSA", "lora_diag") if config.use_kasa else ("AdaLoRA", "lora_E")
        raise ValueError(f"reduce_intruders: {kind} adapters are not supported (their trained singular values "
                         f"{leaf} belong to the directions this would change)")
    if config.use_bdlora is not None:
        raise ValueError("reduce_intruders: BD-LoRA adapters are not supported (new factors from an SVD are not "
                         "block-diagonal); convert them first with lora_jax.bdlora.to_lora")
    if top_k < 1 or not 0.0 <= mitigation_lambda <= 1.0 or threshold_epsilon <= 0.0:
        raise ValueError(f"reduce_intruders: need top_k >= 1, 0 < threshold_epsilon, 0 <= mitigation_lambda <= 1; "
                         f"got top_k={top_k}, threshold_epsilon={threshold_epsilon}, "
                         f"mitigation_lambda={mitigation_lambda}")
    check_adapters(config, params, adapters)
    flat = tree.flatten(params)
    out: Adapters = {}
    found: dict[str, np.ndarray] = {}
    for p, ab in adapters.items():
        if TOKENS in ab:
            out[p] = dict(ab)
            continue
        a, b = ab["lora_A"], ab["lora_B"]
        *stack, d_in, d_out = config.matrix_shape(p, flat[p].shape)
        r = a.shape[-1]
        w = jnp.asarray(dense(flat[p]), jnp.float32).reshape(-1, d_in, d_out)  # [prod(S), in, out]
        fn = functools.partial(_mitigate, top_k=top_k, threshold=threshold_epsilon, keep=mitigation_lambda)
        with jax.default_matmul_precision("highest"):  # the refactored delta is compared with W0 in fp32
            new_a, new_b, n = jax.vmap(fn, in_axes=(0, 0, 0, None))(
                w, jnp.asarray(a, jnp.float32).reshape(-1, d_in, r), jnp.asarray(b, jnp.float32).reshape(-1, r, d_out),
                config.scale_for(p))
        out[p] = dict(ab) | {"lora_A": new_a.reshape(a.shape).astype(a.dtype),
                             "lora_B": new_b.reshape(b.shape).astype(b.dtype)}
        found[p] = np.asarray(n).reshape(stack)
    return out, found
