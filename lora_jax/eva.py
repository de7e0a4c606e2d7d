"""EVA (Explained Variance Adaptation; PEFT `init_lora_weights="eva"`): A from the data.

Each adapted weight W0 [in, out] gets A = the top principal directions of the inputs x that
reach it (the rows x of its matmuls x W0, centred, over the given batches) and B = 0, so the
adapter starts as identity. Ranks are then redistributed: every matrix offers its top
round(r * rho) directions, ranked across the whole model by explained-variance ratio, and the
first sum(r) of them are kept; a matrix that keeps none is left unadapted.

The inputs are read inside the model's own jit: each targeted weight becomes a quax value whose
matmul rule adds x^T x, sum(x) and the token count to host-side float64 sums (through
`jax.debug.callback`, so it works under `jax.jit`, `lax.scan` over layer stacks and
`jax.checkpoint`). The principal directions are then exact (an eigendecomposition of the
covariance over all batches), where PEFT runs an incremental randomized PCA until each layer's
directions stop moving (its `tau`); on enough data both find the same directions.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import threading
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import quax
from jax import lax
from jax.extend.core import primitives as P

from . import tree
from .config import LoraConfig
from .lazy import Stacked, as_matrix, column_norms, dense
from .lora import LORA_BIAS, MAGNITUDE, Adapters, init, init_tokens, target_paths

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


@dataclasses.dataclass
class Moments:
    """Sums over the masked input rows x [in] of one matrix: x^T x, x and their count (float64)."""

    gram: np.ndarray
    total: np.ndarray
    count: float

    def add(self, gram: np.ndarray, total: np.ndarray, count: float) -> None:
        self.gram += gram
        self.total += total
        self.count += count

    def principal(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The top k directions [k, in] of the centred rows, their explained-variance ratios [k]
        and singular values [k], as sklearn's PCA gives them (the largest entry of each direction
        positive)."""
        mean = self.total / self.count
        scatter = self.gram - self.count * np.outer(mean, mean)  # sum of (x - mean)(x - mean)^T
        values, vectors = np.linalg.eigh((scatter + scatter.T) / 2)
        values, vectors = np.clip(values[::-1], 0, None), vectors[:, ::-1].T  # descending; rows
        signs = np.sign(vectors[np.arange(len(vectors)), np.abs(vectors).argmax(1)])
        vectors = vectors * np.where(signs == 0, 1, signs)[:, None]
        trace = values.sum()
        ratio = values / trace if trace > 0 else np.zeros_like(values)
        return vectors[:k], ratio[:k], np.sqrt(values[:k])


class _Recorder:
    """Host-side {(path, matrix index): Moments}, filled by the probes' callbacks."""

    def __init__(self):
        self.moments: dict[tuple[str, int], Moments] = {}
        self._lock = threading.Lock()  # callbacks of successive batches may overlap

    def __call__(self, name: str, idx, gram, total, count) -> None:
        gram, total = np.asarray(gram, np.float64), np.asarray(total, np.float64)
        with self._lock:
            for i in np.asarray(idx).reshape(-1).tolist():
                m = self.moments.setdefault((name, i), Moments(np.zeros_like(gram), np.zeros_like(total), 0.0))
                m.add(gram, total, float(count))


class _Probe(Stacked):
    """A targeted weight w [*S, in, out] that reports the inputs of its matmuls to `recorder`.

    idx [*S] numbers the matrices of the stack, so a layer inside a scan reports its own; rows
    [*S, *R] is the token mask, repeated per matrix so that slicing the stack slices it too.
    """

    w: Any
    idx: jax.Array
    rows: jax.Array | None
    name: str = eqx.field(static=True)
    recorder: _Recorder = eqx.field(static=True)

    def aval(self):
        return jax.core.ShapedArray(self.w.shape, self.w.dtype)

    def materialise(self) -> jax.Array:
        return dense(self.w)

    def map(self, fn) -> "_Probe":
        rows = None if self.rows is None else fn(self.rows)
        return _Probe(fn(self.w), fn(self.idx), rows, self.name, self.recorder)


def _record(probe: _Probe, x: jax.Array, dn, w_is_lhs: bool) -> None:
    (lc, rc), (lb, rb) = dn
    wc, xc, wb = (lc, rc, lb) if w_is_lhs else (rc, lc, rb)
    n = probe.w.ndim
    if tuple(wc) != (n - 2,) or wb:
        return  # not x . W over W's input dim: no layer input here
    x = jnp.moveaxis(x, xc[0], -1)
    rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)  # [N, in]
    if probe.rows is None:
        weight = jnp.ones(rows.shape[:1], jnp.float32)
    else:
        mask = probe.rows.reshape(*probe.idx.shape, -1)[(0,) * probe.idx.ndim]  # one copy: [prod(R)]
        if mask.shape[0] != rows.shape[0]:
            raise ValueError(f"EVA: the token mask {tuple(probe.rows.shape[probe.idx.ndim:])} does not fit the "
                             f"{tuple(x.shape[:-1])} input rows of {probe.name!r}")
        weight = mask.astype(jnp.float32)
    hi = lax.Precision.HIGHEST
    gram = jnp.matmul((rows * weight[:, None]).T, rows, precision=hi)  # [in, in]
    total = jnp.matmul(weight, rows, precision=hi)  # [in]
    jax.debug.callback(functools.partial(probe.recorder, probe.name), probe.idx, gram, total, weight.sum())


def _dot_probe(probe: _Probe, x, dn, kwargs, w_is_lhs: bool):
    x = dense(x)
    _record(probe, x, dn, w_is_lhs)
    args = (probe.w, x) if w_is_lhs else (x, probe.w)
    return quax.quaxify(lax.dot_general)(*args, dn, **kwargs) if tree.is_value(probe.w) \
        else lax.dot_general_p.bind(*args, dimension_numbers=dn, **kwargs)


@quax.register(P.dot_general_p)
def _dot_probe_lhs(lhs: _Probe, rhs: jax.typing.ArrayLike | quax.ArrayValue, *, dimension_numbers, **kwargs):
    return _dot_probe(lhs, rhs, dimension_numbers, kwargs, True)


@quax.register(P.dot_general_p)
def _dot_probe_rhs(lhs: jax.typing.ArrayLike | quax.ArrayValue, rhs: _Probe, *, dimension_numbers, **kwargs):
    return _dot_probe(rhs, lhs, dimension_numbers, kwargs, False)


@quax.register(P.convert_element_type_p)
def _cast_probe(x: _Probe, *, new_dtype, **kwargs):
    return eqx.tree_at(lambda t: t.w, x, lax.convert_element_type(dense(x.w), new_dtype))


def layer_inputs(config: LoraConfig, params: PyTree, f: Callable[[PyTree, Any], Any], batches: Iterable[Any], *,
                 mask: Callable[[Any], Any] | None = None) -> dict[tuple[str, int], Moments]:
    """The input moments of every matrix `config` targets, over `batches`.

    Args:
      f: `f(params, batch)`, the forward pass (its result is not used); jitted once here.
      batches: batch pytrees of one shape (a ragged last batch compiles once more).
      mask: `mask(batch)` -> which input rows count, shaped like the rows of each targeted matmul
        ([B, T] for a language model: attention mask, or the positions that carry a loss, as
        PEFT's label mask). None counts every row.
    Returns:
      {(path, i): Moments}, i the matrix's index in its flattened stack (0 when unstacked);
      a weight that never met a matmul over its input dimension is absent. Each holds an
      in x in float64 sum on the host (GPT-2's MLP c_proj: 3072^2 * 8 B = 75 MB per layer).
    """
    paths = target_paths(config, params)
    recorder = _Recorder()

    def probed(params, batch):
        rows = None if mask is None else jnp.asarray(mask(batch))

        def swap(path, w):
            if path not in paths:
                return w
            stack = config.matrix_shape(path, w.shape)[:-2]
            idx = jnp.arange(math.prod(stack), dtype=jnp.int32).reshape(stack)
            r = None if rows is None else jnp.broadcast_to(rows, (*stack, *rows.shape))
            return as_matrix(w, *config.axes_for(path), lambda view: _Probe(view, idx, r, path, recorder))
        quax.quaxify(f)(tree.map_with_path(swap, params), batch)  # only the callbacks are wanted

    run = jax.jit(probed)
    n = 0
    for batch in batches:
        run(params, batch)
        n += 1
    jax.effects_barrier()  # every callback has run
    if n == 0:
        raise ValueError("EVA needs at least one batch; `batches` was empty")
    return recorder.moments


def init_eva(config: LoraConfig, params: PyTree, f: Callable[[PyTree, Any], Any], batches: Iterable[Any], *,
             mask: Callable[[Any], Any] | None = None, eva: EvaConfig = EvaConfig(), key: jax.Array | None = None,
             dtype: Any = jnp.float32) -> tuple[LoraConfig, Adapters]:
    """EVA adapters for `config`'s targets: (the config with EVA's ranks, the adapters).

    Args:
      config: targets, rank (the budget is the sum of every matrix's rank) and alpha.
      params: the frozen parameters `f` runs with.
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
    seen = [p for p in paths if any(name == p for name, _ in moments)]
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
        for i in range(math.prod(stack)):
            m = moments.get((p, i))
            if m is None or m.count < k:
                raise ValueError(f"EVA saw {0 if m is None else int(m.count)} input rows at {p!r} (matrix {i}), "
                                 f"fewer than the {k} directions it offers: pass more or longer batches")
            principal[p, i] = m.principal(k)
            offers += [(-float(v), order, i, j) for j, v in enumerate(principal[p, i][1])]
            budget += r
    offers.sort()
    ranks = {(p, i): 0 for p, i in principal}
    for _, order, i, _ in offers[:budget]:
        ranks[seen[order], i] += 1

    adapters: Adapters = {}
    rank_pattern, alpha_pattern, dropped = {}, {}, []
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
            u, _, sv = principal[p, i]
            u = u[:k] / np.sqrt(np.maximum(sv[:k], np.finfo(np.float64).tiny))[:, None] if eva.whiten else u[:k]
            a[i, :, :k] = u.T  # [in, k]
        adapters[p] = {"lora_A": jnp.asarray(a.reshape(*stack, d_in, new), dtype),
                       "lora_B": jnp.zeros((*stack, new, d_out), dtype)}
        if config.use_dora:
            adapters[p][MAGNITUDE] = column_norms(dense(flat[p]).reshape(views[p])).astype(dtype)
        if config.lora_bias:
            adapters[p][LORA_BIAS] = jnp.zeros((*stack, d_out), dtype)
        module = re.escape(p.rsplit("/", 1)[0])
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
