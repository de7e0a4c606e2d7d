"""What each adapted matrix sees: the input rows of its matmuls, summed over batches (for EVA, CorDA).

`layer_inputs` runs `f(params, batch)` under jit with every targeted weight swapped for a quax
value whose matmul rule adds x^T x, sum(x) and the row count of its input to float64 sums on
the host (through `jax.debug.callback`, so it works under `jax.jit`, `lax.scan` over layer
stacks and `jax.checkpoint`). A token mask picks the rows that count (no padding; PEFT's label
mask); each stacked matrix reports its own index.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
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
from .lazy import Stacked, as_matrix, dense, lift, quaxify
from .lora import target_paths

PyTree = Any


@dataclasses.dataclass
class Moments:
    """Sums over the masked input rows x [in] of one matrix: x^T x, x and their count (float64),
    and the number of samples they came from (with `normalise`; else of matmul calls)."""

    gram: np.ndarray
    total: np.ndarray
    count: float = 0.0
    calls: int = 0

    def add(self, gram: np.ndarray, total: np.ndarray, count: float, calls: int) -> None:
        self.gram += gram
        self.total += total
        self.count += count
        self.calls += calls

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

    def __call__(self, name: str, idx, gram, total, count, calls) -> None:
        gram, total = np.asarray(gram, np.float64), np.asarray(total, np.float64)
        with self._lock:
            for i in np.asarray(idx).reshape(-1).tolist():
                m = self.moments.setdefault((name, i), Moments(np.zeros_like(gram), np.zeros_like(total)))
                m.add(gram, total, float(count), int(calls))


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
    normalise: bool = eqx.field(static=True)

    def aval(self):
        return jax.core.ShapedArray(self.w.shape, self.w.dtype)

    def materialise(self) -> jax.Array:
        return dense(self.w)

    def map(self, fn) -> "_Probe":
        rows = None if self.rows is None else fn(self.rows)
        return _Probe(lift(fn)(self.w), fn(self.idx), rows, self.name, self.recorder, self.normalise)


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
            raise ValueError(f"the token mask {tuple(probe.rows.shape[probe.idx.ndim:])} does not fit the "
                             f"{tuple(x.shape[:-1])} input rows of {probe.name!r}")
        weight = mask.astype(jnp.float32)
    calls = jnp.ones((), jnp.int32)
    if probe.normalise:
        # CorDA: each sample's rows (x's leading dim) over |their largest value|, as PEFT's hook scales
        # each forward call of one sample; the samples are counted as its calls are.
        samples = x.shape[0] if x.ndim > 1 else 1
        per = rows.reshape(samples, -1, rows.shape[-1])  # [samples, rows each, in]
        kept = weight.reshape(samples, -1, 1) > 0
        top = jnp.abs(jnp.max(jnp.where(kept, per, -jnp.inf), axis=(1, 2)))  # [samples]
        present = jnp.any(kept, axis=(1, 2))
        rows = (per / jnp.where(present, top, 1.0)[:, None, None]).reshape(rows.shape)
        calls = jnp.sum(present, dtype=jnp.int32)
    hi = lax.Precision.HIGHEST
    gram = jnp.matmul((rows * weight[:, None]).T, rows, precision=hi)  # [in, in]
    total = jnp.matmul(weight, rows, precision=hi)  # [in]
    jax.debug.callback(functools.partial(probe.recorder, probe.name), probe.idx, gram, total, weight.sum(), calls)


def _dot_probe(probe: _Probe, x, dn, kwargs, w_is_lhs: bool):
    x = dense(x)
    _record(probe, x, dn, w_is_lhs)
    args = (probe.w, x) if w_is_lhs else (x, probe.w)
    return lift(lax.dot_general)(*args, dn, **kwargs)


@quax.register(P.dot_general_p)
def _dot_probe_lhs(lhs: _Probe, rhs: jax.typing.ArrayLike | quax.ArrayValue, *, dimension_numbers, **kwargs):
    return _dot_probe(lhs, rhs, dimension_numbers, kwargs, True)


@quax.register(P.dot_general_p)
def _dot_probe_rhs(lhs: jax.typing.ArrayLike | quax.ArrayValue, rhs: _Probe, *, dimension_numbers, **kwargs):
    return _dot_probe(rhs, lhs, dimension_numbers, kwargs, False)


@quax.register(P.convert_element_type_p)
def _cast_probe(x: _Probe, *, new_dtype, **kwargs):
    return eqx.tree_at(lambda t: t.w, x, lift(lambda v: lax.convert_element_type(v, new_dtype))(x.w))


def layer_inputs(config: LoraConfig, params: PyTree, f: Callable[[PyTree, Any], Any], batches: Iterable[Any], *,
                 mask: Callable[[Any], Any] | None = None,
                 normalise: bool = False) -> dict[tuple[str, int], Moments]:
    """The input moments of every matrix `config` targets, over `batches`.

    Args:
      f: `f(params, batch)`, the forward pass (its result is not used); jitted once here.
      batches: batch pytrees of one shape (a ragged last batch compiles once more).
      mask: `mask(batch)` -> which input rows count, shaped like the rows of each targeted matmul
        ([B, T] for a language model: attention mask, or the positions that carry a loss, as
        PEFT's label mask). None counts every row.
      normalise: divide each sample's rows (a sample: an index of the inputs' leading dim) by the
        absolute value of their largest entry before summing, and count samples (CorDA's scaling).
    Returns:
      {(path, i): Moments}, i the matrix's index in its flattened stack (0 when unstacked);
      a weight that never met a matmul over its input dimension is absent. Each holds an
      in x in float64 sum on the host (GPT-2's MLP c_proj: 3072^2 * 8 B = 75 MB per layer).
    """
    paths = set(target_paths(config, params))
    recorder = _Recorder()

    def probed(params, batch):
        rows = None if mask is None else jnp.asarray(mask(batch))

        def swap(path, w):
            if path not in paths:
                return w
            stack = config.matrix_shape(path, w.shape)[:-2]
            idx = jnp.arange(math.prod(stack), dtype=jnp.int32).reshape(stack)
            r = None if rows is None else jnp.broadcast_to(rows, (*stack, *rows.shape))
            probe = functools.partial(_Probe, idx=idx, rows=r, name=path, recorder=recorder, normalise=normalise)
            return as_matrix(w, *config.axes_for(path), probe)
        quaxify(f)(tree.map_with_path(swap, params), batch)  # only the callbacks are wanted

    run = jax.jit(probed)
    n = 0
    for batch in batches:
        run(params, batch)
        n += 1
    jax.effects_barrier()  # every callback has run
    if n == 0:
        raise ValueError("layer_inputs needs at least one batch; `batches` was empty")
    return recorder.moments
