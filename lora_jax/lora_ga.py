"""LoRA-GA (PEFT `init_lora_weights="lora_ga"`): the adapter aligned with the first gradients.

The gradient G of the loss with respect to each targeted W0, averaged over a few batches, is
split by SVD (G^T = U S V^T, torch's (out, in) orientation); A and B take 2r of its singular
directions between them so that the first steps of LoRA move W0 + s*A*B along full
fine-tuning's first steps. The base keeps W_res = W0 - s*A*B, so the model is unchanged at step
0 and `to_plain` turns trained adapters into plain LoRA on W0, as for PiSSA.

As PEFT's `LoraGAConfig`: `direction` says which singular directions go where (ArB2r: A the
first r right ones, B the next r left ones times their singular values), `scale` how B (or
both) are scaled (stable: B * out^(1/4) / sqrt(gamma)). The gradients are those of the
targeted weights alone (jax.grad over them, the rest closed over), one full-size gradient per
targeted weight, as PEFT holds; the SVD is exact (float64), where PEFT uses torch.svd_lowrank.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import tree
from .config import LoraConfig
from .lora import Adapters, target_paths
from .residual import per_matrix, residual_init

PyTree = Any
DIRECTIONS = ("ArBr", "A2rBr", "ArB2r", "random")
SCALES = ("stable", "weight_svd", "gd_scale", "unit")


@dataclasses.dataclass(frozen=True)
class LoraGAConfig:
    """PEFT's LoraGAConfig: `direction` in DIRECTIONS, `scale` in SCALES, `stable_gamma` > 0."""

    direction: str = "ArB2r"
    scale: str = "stable"
    stable_gamma: float = 16

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise ValueError(f"LoraGAConfig.direction {self.direction!r}: expected one of {DIRECTIONS}")
        if self.scale not in SCALES:
            raise ValueError(f"LoraGAConfig.scale {self.scale!r}: expected one of {SCALES}")
        if isinstance(self.stable_gamma, bool) or not isinstance(self.stable_gamma, (int, float)) \
                or not self.stable_gamma > 0:
            raise ValueError(f"LoraGAConfig.stable_gamma must be a positive number, got {self.stable_gamma!r}")


def mean_gradients(config: LoraConfig, params: PyTree, loss_fn: Callable[[PyTree, Any], jax.Array],
                   batches: Iterable[Any]) -> dict[str, np.ndarray]:
    """{path: the mean over `batches` of d loss_fn(params, batch) / d W0} for the targeted W0 only."""
    paths = target_paths(config, params)
    flat = tree.flatten(params)

    @jax.jit
    def grads(targeted, params, batch):
        return jax.grad(lambda t: loss_fn(tree.map_with_path(lambda p, x: t.get(p, x), params), batch))(targeted)

    targeted = {p: flat[p] for p in paths}
    total, n = None, 0
    for batch in batches:
        g = grads(targeted, params, batch)
        total = g if total is None else jax.tree.map(jnp.add, total, g)
        n += 1
    if n == 0:
        raise ValueError("LoRA-GA needs at least one batch; `batches` was empty")
    return {p: np.asarray(v, np.float64) / n for p, v in total.items()}


def ga_factors(grad: np.ndarray, w: np.ndarray, r: int, scale: float, ga: LoraGAConfig,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """grad and w [in, out] -> A [in, r], B [r, out] (PEFT's lora_ga_init, in our layout)."""
    u, s, vh = np.linalg.svd(grad.T, full_matrices=False)  # (out, k), (k,), (k, in)
    u, s, vh = u[:, : 2 * r], s[: 2 * r], vh[: 2 * r]
    pick_a, pick_b = {
        "ArBr": (slice(1, 2 * r, 2), slice(0, 2 * r, 2)),
        "A2rBr": (slice(r, 2 * r), slice(0, r)),
        "ArB2r": (slice(0, r), slice(r, 2 * r)),
    }.get(ga.direction, (None, None))
    if ga.direction == "random":
        pick_a = pick_b = rng.permutation(2 * r)[:r]
    a, s_b = vh[pick_a], s[pick_b]  # (r, in), (r,)
    b = u[:, pick_b] * s_b  # (out, r)
    if ga.scale == "stable":
        b = b * grad.shape[1] ** 0.25 / ga.stable_gamma ** 0.5
    elif ga.scale == "weight_svd" and s_b[0] > 0:
        b = b * np.linalg.svd(w, compute_uv=False)[0] / s_b[0]
    elif ga.scale == "gd_scale":
        a, b = a / scale, b / scale
    return a.T, b.T


def init_lora_ga(config: LoraConfig, params: PyTree, loss_fn: Callable[[PyTree, Any], jax.Array],
                 batches: Iterable[Any], *, ga: LoraGAConfig = LoraGAConfig(), seed: int = 0,
                 dtype: Any = jnp.float32) -> tuple[PyTree, Adapters]:
    """LoRA-GA's (params with W_res, adapters) for `config` (init="lora_ga").

    Args:
      config: targets, ranks, scales; `init` must be "lora_ga" (the adapters act on W_res).
      params: full-precision params; quantize the returned ones for QLoRA.
      loss_fn: `loss_fn(params, batch)` -> scalar loss, the one training will use.
      batches: the batches whose mean gradient sets the directions.
      ga: direction and scaling (PEFT's LoraGAConfig defaults).
      seed: for `direction="random"`.
    Returns:
      (params, adapters) as `init_residual` returns them; `to_plain(config, trained, adapters)`
      gives plain LoRA on the original weights.
    """
    if config.init != "lora_ga":
        raise ValueError(f"init_lora_ga needs a config with init='lora_ga' (its adapters act on the residual "
                         f"weights), got init={config.init!r}")
    flat = tree.flatten(params)
    quantized = [p for p in target_paths(config, params) if tree.is_value(flat[p])]
    if quantized:
        raise ValueError(f"LoRA-GA differentiates the full-precision weights; {quantized[0]!r} is "
                         f"{type(flat[quantized[0]]).__name__}: initialise before quant.quantize")
    grads = mean_gradients(config, params, loss_fn, batches)
    rng = np.random.default_rng(seed)

    def one(path: str, j: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        r = config.rank_for(path)
        if 2 * r > min(w.shape):
            raise ValueError(f"LoRA-GA splits 2r = {2 * r} singular directions of {path!r}'s gradient "
                             f"{w.shape} between A and B: use a rank <= {min(w.shape) // 2}")
        return ga_factors(grads[path].reshape(-1, *w.shape)[j], w, r, config.scale_for(path), ga, rng)
    return residual_init(config, params, per_matrix(one), dtype=dtype)
