"""EVA (Explained Variance Adaptation; PEFT `init_lora_weights="eva"`): A from the data.

Each adapted weight W0 [in, out] gets A = the top principal directions of the inputs x that
reach it (the rows x of its matmuls x W0, centred, over the given batches) and B = 0, so the
adapter starts as identity. Ranks are then redistributed: every matrix offers its top
round(r * rho) directions, ranked across the whole model by explained-variance ratio, and the
first sum(r) of them are kept; a matrix that keeps none is left unadapted.

The inputs come from `inputs.layer_inputs` (read inside the model's own jit). The principal
directions are exact (an eigendecomposition of the covariance over all batches), where PEFT
runs an incremental randomized PCA until each layer's directions stop moving (its `tau`); on
enough data both find the same directions.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import tree
from .config import LoraConfig
from .inputs import layer_inputs
from .lazy import column_norms, dense
from .lora import LORA_BIAS, MAGNITUDE, Adapters, init, init_tokens, layer_gate, target_paths

PyTree = Any


@dataclasses.dataclass(frozen=True)
class EvaConfig:
    """PEFT's EvaConfig, less what exact PCA makes moot (`tau`) or what the mask does.

    Attributes:
      rho: each matrix may take up to round(r * rho) ranks (>= 1; 1 keeps every rank at r).
      whiten: divide each direction by the square root of its singular value (PEFT `whiten`).
      adjust_scaling_factors: alpha follows the new rank (alpha * r_new / r), so the scale
        alpha / r stays what the config says (PEFT's default).
    """

    rho: float = 2.0
    whiten: bool = False
    adjust_scaling_factors: bool = True

    def __post_init__(self):
        if not isinstance(self.rho, (int, float)) or isinstance(self.rho, bool) or not self.rho >= 1.0 \
                or not math.isfinite(self.rho):
            raise ValueError(f"EvaConfig.rho must be a finite number >= 1, got {self.rho!r}")
        for name in ("whiten", "adjust_scaling_factors"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"EvaConfig.{name} must be true or false, got {getattr(self, name)!r}")


def init_eva(config: LoraConfig, params: PyTree, f: Callable[[PyTree, Any], Any], batches: Iterable[Any], *,
             mask: Callable[[Any], Any] | None = None, eva: EvaConfig = EvaConfig(), key: jax.Array | None = None,
             dtype: Any = jnp.float32) -> tuple[LoraConfig, Adapters]:
    """EVA adapters for `config`'s targets: (the config with EVA's ranks, the adapters).

    Args:
      config: targets, rank (the budget is the sum of every matrix's rank) and alpha.
      params: the frozen parameters `f` runs with (4-bit `quant` weights too: EVA then reads the
        4-bit model's layer inputs).
      f, batches, mask: as for `layer_inputs`: `f(params, batch)` over the calibration data.
      eva: rho, whitening, scale adjustment.
      key: initialises the targets EVA cannot see (no matmul over their input, such as an
        embedding lookup) with `config`'s kaiming init, as PEFT does; a warning names them.
    Returns:
      (config, adapters): init="eva"; rank_pattern / alpha_pattern carry the new ranks (and,
      with `adjust_scaling_factors`, alphas); matrices given no rank are added to `exclude`.
      A = the directions (whitened if asked), B = 0; DoRA's magnitude = W0's column norms.
    """
    if config.changes_base:
        raise ValueError(f"init={config.init!r} changes the base weights; EVA initialises plain LoRA factors")
    moments = layer_inputs(config, params, f, batches, mask=mask)
    flat = tree.flatten(params)
    paths = target_paths(config, params)
    reached = {name for name, _ in moments}
    seen = [p for p in paths if p in reached]
    unseen = [p for p in paths if p not in seen]
    if unseen and key is None:
        raise ValueError(f"EVA cannot initialise {unseen} (no matmul over their input): pass key= for "
                         "their kaiming init, as PEFT gives them, or exclude them")
    views = {p: config.matrix_shape(p, flat[p].shape) for p in paths}

    # Each matrix offers round(r * rho) directions; the sum(r) best ratios model-wide are kept.
    offers, budget, principal = [], 0, {}
    for order, p in enumerate(seen):
        *stack, d_in, d_out = views[p]
        r = config.rank_for(p)
        k = min(round(r * eva.rho), d_in, d_out)
        gate = layer_gate(config, p, flat[p].shape)
        for i in range(math.prod(stack)):
            if gate is not None and not gate.reshape(-1)[i]:
                continue  # a layer layers_to_transform leaves out: no offer, no budget, rank 0
            m = moments.get((p, i))
            if m is None or m.count < k:
                raise ValueError(f"EVA saw {0 if m is None else int(m.count)} input rows at {p!r} (matrix {i}), "
                                 f"fewer than the {k} directions it offers: pass more or longer batches")
            principal[p, i] = m.principal(k)
            offers += [(-float(v), order, i, j) for j, v in enumerate(principal[p, i][1])]
            budget += r
    offers.sort()
    ranks = {(p, i): 0 for p in seen for i in range(math.prod(views[p][:-2]))}
    for _, order, i, _ in offers[:budget]:
        ranks[seen[order], i] += 1

    adapters: Adapters = {}
    rank_pattern, alpha_pattern, dropped = {}, {}, []
    per_module = collections.Counter(p.rsplit("/", 1)[0] for p in seen)
    for p in seen:
        *stack, d_in, d_out = views[p]
        r, scale = config.rank_for(p), config.scale_for(p)
        layer_ranks = [ranks[p, i] for i in range(math.prod(stack))]
        new = max(layer_ranks)
        if new == 0:
            dropped.append(p)
            continue
        alpha = scale * (math.sqrt(r) if config.use_rslora else r)
        new_alpha = alpha * new / r if eva.adjust_scaling_factors else alpha
        _check_stack(config, p, layer_ranks, eva)
        a = np.zeros((math.prod(stack), d_in, new), np.float32)
        for i, k in enumerate(layer_ranks):  # a stacked matrix given fewer ranks keeps zero columns
            if k == 0:
                continue
            u, _, sv = principal[p, i]
            u = u[:k] / np.sqrt(np.maximum(sv[:k], np.finfo(np.float64).tiny))[:, None] if eva.whiten else u[:k]
            a[i, :, :k] = u.T  # [in, k]
        adapters[p] = {"lora_A": jnp.asarray(a.reshape(*stack, d_in, new), dtype),
                       "lora_B": jnp.zeros((*stack, new, d_out), dtype)}
        if config.use_dora:
            adapters[p][MAGNITUDE] = column_norms(dense(flat[p]).reshape(views[p])).astype(dtype)
        if config.lora_bias:
            adapters[p][LORA_BIAS] = jnp.zeros((*stack, d_out), dtype)
        # PEFT's patterns name modules; two targets in one module (target_parameters) need their own
        module = p.rsplit("/", 1)[0]
        module = re.escape(module if per_module[module] == 1 else p)
        if new != r:
            rank_pattern[module] = new
        if not math.isclose(new_alpha, alpha, rel_tol=1e-12):
            alpha_pattern[module] = new_alpha
    exclude = config.exclude
    if dropped:
        exclude = (f"(?:{exclude})|" + "|".join(map(re.escape, dropped)) if isinstance(exclude, str)
                   else (*(exclude or ()), *dropped))
    # The new entries go first: the first pattern matching a path decides.
    first = lambda new, old: {**new, **{k: v for k, v in old.items() if k not in new}}  # noqa: E731
    out = dataclasses.replace(config, init="eva", exclude=exclude,
                              rank_pattern=first(rank_pattern, config.rank_pattern),
                              alpha_pattern=first(alpha_pattern, config.alpha_pattern))
    if unseen:
        warnings.warn(f"EVA saw no matmul over the input of {len(unseen)} target(s), {unseen}: they start "
                      "from the kaiming init, as in PEFT", stacklevel=2)
        plain = dataclasses.replace(config, init="kaiming_uniform", targets=tuple(unseen), exclude=None,
                                    trainable_tokens=None)
        adapters |= init(plain, params, key, dtype=dtype)
    return out, adapters | init_tokens(out, params, dtype=dtype)


def _check_stack(config: LoraConfig, path: str, ranks: list[int], eva: EvaConfig) -> None:
    """A stack holds one rank and one scale: its matrices' EVA ranks are zero-padded to the
    largest (zero A and B columns get zero gradients, so they stay zero), which is exact only if
    their scales agree and a rank-0 matrix has nothing else that trains."""
    if 0 in ranks and (config.use_dora or config.lora_bias):
        raise ValueError(f"EVA gave the stacked matrices of {path!r} ranks {ranks}; a matrix left out keeps "
                         f"training its {'DoRA magnitude' if config.use_dora else 'lora_B bias'} in a stack: "
                         "use EvaConfig(rho=1), or unstacked params")
    if len({k for k in ranks if k}) > 1 and (config.use_rslora or not eva.adjust_scaling_factors):
        raise ValueError(f"EVA gave the stacked matrices of {path!r} ranks {ranks}, whose scales alpha/r "
                         f"would differ (use_rslora={config.use_rslora}, adjust_scaling_factors="
                         f"{eva.adjust_scaling_factors}); a stack has one scale: use EvaConfig(rho=1), "
                         "adjust_scaling_factors=True without use_rslora, or unstacked params")
