"""CorDA (PEFT `init_lora_weights="corda"`): the adapter from W0 decomposed along its inputs.

With C the (damped) covariance of a matrix's inputs on calibration data, W0 C = U S V^T gives
W0 = U S (V^T C^-1), components ordered by how much they act on the inputs the data brings.
IPM (instruction-previewed) puts the r largest into the adapter, to train first what the task
uses; KPM (knowledge-preserved) the r smallest, leaving the base's most used directions
frozen. The base keeps the rest, W_res = W0 - s*A*B, so the model is unchanged at step 0 and
`to_plain` turns trained adapters into plain LoRA on W0, as for PiSSA.

As PEFT's `preprocess_corda`: C is the mean over samples of x^T x over each sample's rows
scaled by their largest value (PEFT scales each forward call of one sample), damped by 1% of
its mean diagonal, doubled until C's inverse is accurate (checked in float32, as PEFT does, so
both pick the same damping); the SVD runs in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax.numpy as jnp
import numpy as np

from .config import LoraConfig
from .inputs import layer_inputs
from .lora import Adapters, target_paths
from .residual import per_matrix, residual_init

PyTree = Any
METHODS = ("ipm", "kpm")
_MAX_DOUBLINGS = 64


def damped(cov: np.ndarray, path: str) -> tuple[np.ndarray, np.ndarray]:
    """(C + d * mean(diag C) * I, its inverse) with PEFT's damping d: 0.01, doubled until
    ||C' C'^-1 - I|| < 0.05 in float32."""
    mean = float(np.mean(np.diag(cov)))
    if not np.isfinite(mean) or mean <= 0:
        raise ValueError(f"CorDA: the inputs of {path!r} have covariance trace {mean * len(cov)}; "
                         "they must be finite and not all zero")
    eye, damp = np.eye(len(cov)), 0.01
    for _ in range(_MAX_DOUBLINGS):
        fixed = (cov + eye * mean * damp).astype(np.float32)
        inv = np.linalg.inv(fixed)
        if np.linalg.norm(fixed @ inv - eye) < 0.05:
            fixed = cov + eye * mean * damp
            return fixed, np.linalg.inv(fixed)
        damp *= 2
    raise ValueError(f"CorDA: the input covariance of {path!r} stays singular after damping")


def corda_factors(w: np.ndarray, cov: np.ndarray, r: int, scale: float, method: str,
                  path: str = "") -> tuple[np.ndarray, np.ndarray]:
    """w [in, out] and its input covariance [in, in] -> A [in, r], B [r, out] with s*A*B the r
    components `method` picks (PEFT's collect_eigens_for_layer, crop_corda_eigens, corda_init)."""
    fixed, inv = damped(np.asarray(cov, np.float64), path)
    u, sv, vh = np.linalg.svd(np.asarray(w, np.float64).T @ fixed, full_matrices=False)  # (out, in) C'
    v = (vh @ inv).T  # [in, k]: W0 = u diag(sv) v^T
    pick = slice(0, r) if method == "ipm" else slice(len(sv) - r, len(sv))
    root = np.sqrt(sv[pick] / scale)
    return v[:, pick] * root, (u[:, pick] * root).T


def init_corda(config: LoraConfig, params: PyTree, f: Callable[[PyTree, Any], Any], batches: Iterable[Any], *,
               mask: Callable[[Any], Any] | None = None, method: str = "ipm",
               dtype: Any = jnp.float32) -> tuple[PyTree, Adapters]:
    """CorDA's (params with W_res, adapters) for `config` (init="corda").

    Args:
      config: targets, ranks, scales; `init` must be "corda" (the adapters act on W_res).
      params: full-precision params; quantize the returned ones for QLoRA.
      f, batches, mask: `f(params, batch)` over the calibration data, as for
        `inputs.layer_inputs` (mask: which rows count; PEFT's CorDA takes every token).
      method: "ipm" (largest components into the adapter) or "kpm" (smallest).
      dtype: factor dtype.
    Returns:
      (params, adapters) as `init_residual` returns them; `to_plain(config, trained, adapters)`
      gives plain LoRA on the original weights.
    """
    if config.init != "corda":
        raise ValueError(f"init_corda needs a config with init='corda' (its adapters act on the residual "
                         f"weights), got init={config.init!r}")
    if method not in METHODS:
        raise ValueError(f"CorDA method {method!r}: expected one of {METHODS}")
    moments = layer_inputs(config, params, f, batches, mask=mask, normalise=True)
    reached = {name for name, _ in moments}
    for p in target_paths(config, params):
        if p not in reached:
            raise ValueError(f"CorDA needs the inputs of {p!r}, which met no matmul over its input dimension "
                             "(an embedding?): exclude it")

    def one(path: str, j: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if (path, j) not in moments:
            raise ValueError(f"CorDA saw no inputs for matrix {j} of the stack {path!r}")
        m = moments[path, j]  # PEFT's C is the mean over samples; its scale splits s*A*B between A and B
        return corda_factors(w, m.gram / m.calls, config.rank_for(path), config.scale_for(path), method,
                             f"{path} (matrix {j})")
    return residual_init(config, params, per_matrix(one), dtype=dtype)
