"""Several named adapters on one base: switch, disable, combine, hot-swap, and mixed-adapter batches.

    m = multi(model.apply, {"qa": cfg_qa, "chat": cfg_chat})
    bank = {"qa": adapters_qa, "chat": adapters_chat}               # a pytree: jit passes it
    m.switch(params, bank, ids, adapter="qa")                        # one adapter (static name)
    m.switch(params, bank, ids, adapter=None)                        # the base model
    m.mixed(params, bank, ids, adapter_ids=m.ids(["qa", None, "chat"]))  # per example
    config, adapters = combine(m_configs, bank, {"qa": 0.7, "chat": 0.3}, how="linear")
    config, same_shape = hotswappable(m_configs, bank)    # one jit(lj.apply(f, config)) runs each

A mixed batch keeps one copy of the base weights: each targeted kernel becomes a
`MultiLoraArray` holding W0, every adapter's factors stacked [*S, N, in, r] (each adapter's
scale folded into its A, ranks zero-padded, zeros where an adapter does not target the kernel)
and the example -> adapter indices. Its matmul computes x.W0 + (x_b.A[id_b]).B[id_b] per
example b, gathering the factors; an index of -1 or N means "no adapter" for that example. An
embedding table looked up by row gives example b the rows W0[i] + A[id_b][i].B[id_b].
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import quax
from jax import lax
from jax.extend.core import primitives as P

from . import merging, tree
from .config import LoraConfig
from .lazy import StackedFactors, as_matrix, dense, lift, quaxify
from .lora import STRATEGIES, Adapters, apply, check_adapters

PyTree = Any
ArrayLike = jax.typing.ArrayLike
BASE = "__base__"  # PEFT's adapter_names entry for "no adapter" in a mixed batch
COMBINATIONS = ("linear", "cat", "svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd",
                "ties", "dare_linear", "dare_ties", "magnitude_prune")


class MixedBatchError(RuntimeError):
    """A per-example (mixed-adapter) weight met an operation that needs one dense weight."""


class MultiLoraArray(StackedFactors):
    """W0 plus, for example b, adapter ids[b]'s delta A.B (scale already folded into A).

    w [*S, in, out]; a [*S, N, in, r]; b [*S, N, r, out]; ids [*S, B] int32 (the batch's
    indices, repeated over the stack dims so that a scan over layers slices every leaf alike).
    """

    w: Any  # a jax.Array, or a quax value such as quant.QuantizedArray
    a: jax.Array
    b: jax.Array
    ids: jax.Array
    name: str = eqx.field(static=True)

    def materialise(self) -> jax.Array:
        raise MixedBatchError(
            f"mixed-adapter weight {self.name!r} {tuple(self.w.shape)} met an operation that needs one "
            "dense weight; in a mixed batch a targeted kernel may only be the right operand of a matmul "
            "(x @ W) whose first input dimension is the batch, or a table looked up by rows of batch-first ids"
        )

    def map(self, fn: Callable[[jax.Array], jax.Array]) -> "MultiLoraArray":
        """Apply an op on the leading stack dims to every leaf."""
        return eqx.tree_at(lambda t: (t.w, t.a, t.b, t.ids), self,
                           (lift(fn)(self.w), fn(self.a), fn(self.b), fn(self.ids)))


def _dense(x):
    # quax hands plain operands to rules wrapped; unwrap to a JAX array.
    return dense(x) if not isinstance(x, MultiLoraArray) else x


@quax.register(P.dot_general_p)
def _dot_mixed(lhs: ArrayLike | quax.ArrayValue, rhs: MultiLoraArray, *, dimension_numbers, **kwargs):
    x, m = _dense(lhs), rhs
    (xc, wc), (xb, wb) = dimension_numbers
    batch = m.ids.shape[-1]
    if m.w.ndim != 2 or xb or wb or len(wc) != 1 or 0 in xc or x.shape[0] != batch:
        return m.materialise()  # raises: no per-example form for this matmul
    base = lift(lax.dot_general)(x, m.w, dimension_numbers, **kwargs)  # [B, *x_free, o]
    n = m.a.shape[0]
    valid = (m.ids >= 0) & (m.ids < n)  # [B]; -1 or N: this example runs the base
    idx = jnp.clip(m.ids, 0, n - 1)
    a, b = m.a[idx], m.b[idx]  # [B, in, r], [B, r, out]
    if wc[0] == 1:  # x contracts W's output dim: x.(A B)^T = (x.B^T).A^T
        a, b = jnp.swapaxes(b, -1, -2), jnp.swapaxes(a, -1, -2)
    xm = jnp.moveaxis(x, xc[0], -1)  # [B, *x_free, in]; the free dims keep their order
    t = jnp.einsum("b...i,bir->b...r", xm, a.astype(x.dtype))  # [B, *x_free, r]
    u = jnp.einsum("b...r,bro->b...o", t, b.astype(x.dtype))  # [B, *x_free, o]
    u = jnp.where(valid.reshape((batch,) + (1,) * (u.ndim - 1)), u, 0)
    return base + u.astype(base.dtype)


@quax.register(P.gather_p)
def _gather_mixed(operand: MultiLoraArray, indices: ArrayLike | quax.ArrayValue, *, dimension_numbers, slice_sizes,
                  **kwargs):
    # An embedding lookup in a mixed batch, rows of W [V, D] for token ids [B, ..., 1]: example b's rows
    # are W0[i] + A[id_b][i] B[id_b] (PEFT's Embedding._mixed_batch_forward). Every adapter's rows of A
    # come from one gather of A viewed [V, N * r], with the lookup's own index semantics (fill / clip).
    dn, w, idx = dimension_numbers, operand.w, dense(indices)
    n, r, batch = operand.a.shape[0], operand.a.shape[-1], operand.ids.shape[-1]
    row_lookup = (
        not tree.is_value(w) and w.ndim == 2 and idx.ndim >= 2 and idx.shape[0] == batch
        and tuple(dn.collapsed_slice_dims) == (0,) and tuple(dn.start_index_map) == (0,)
        and not dn.operand_batching_dims and tuple(slice_sizes) == (1, w.shape[1])
    )
    if not row_lookup:
        return operand.materialise()  # raises: no per-example form for this lookup
    base = lax.gather_p.bind(w, idx, dimension_numbers=dn, slice_sizes=slice_sizes, **kwargs)  # [B, ..., D, ...]
    a = jnp.moveaxis(operand.a, 0, 1).reshape(w.shape[0], n * r)  # [V, N * r]
    rows = lax.gather_p.bind(a, idx, dimension_numbers=dn, slice_sizes=(1, n * r), **kwargs)  # [B, ..., N * r, ...]
    (off,) = dn.offset_dims
    rows = jnp.moveaxis(rows, off, -1)  # [B, ..., N * r]
    rows = rows.reshape(*rows.shape[:-1], n, r)  # [B, ..., N, r]
    valid = (operand.ids >= 0) & (operand.ids < n)  # [B]; -1 or N: this example runs the base
    idc = jnp.clip(operand.ids, 0, n - 1)
    rows = jnp.take_along_axis(rows, idc.reshape((batch,) + (1,) * (rows.ndim - 1)), axis=-2)[..., 0, :]  # [B, ..., r]
    u = jnp.einsum("b...r,bro->b...o", rows, operand.b[idc].astype(rows.dtype))  # [B, ..., D]
    u = jnp.where(valid.reshape((batch,) + (1,) * (u.ndim - 1)), u, 0)
    return base + jnp.moveaxis(u, -1, off).astype(base.dtype)


@quax.register(P.dot_general_p)
def _dot_mixed_lhs(lhs: MultiLoraArray, rhs: ArrayLike | quax.ArrayValue, *, dimension_numbers, **kwargs):
    return lhs.materialise()  # raises: W on the left has no per-example meaning


# ----------------------------------------------------------------------------- stacking


def _no_dora(configs: Mapping[str, LoraConfig], where: str) -> None:
    # DoRA's gain depends on each adapter's whole W0 + s*A*B: no per-example stacking or
    # rank concatenation carries it; `switch` applies such an adapter alone.
    dora = [n for n, c in configs.items() if c.use_dora]
    if dora:
        raise ValueError(f"adapters {dora} use DoRA, which {where} cannot route or sum; use switch")


def _factors_only(configs: Mapping[str, LoraConfig], where: str) -> None:
    # Trained embedding rows replace the table's rows: there is no delta to route per example or to sum.
    # A lora_B bias lives in the module's bias leaf, outside the factors that are routed and summed.
    # aLoRA's adapter acts on some tokens only, which a routed or summed delta does not carry.
    for what, hit in (("train embedding rows (trainable_tokens)", lambda c: c.trainable_tokens is not None),
                      ("have a lora_B bias (lora_bias)", lambda c: c.lora_bias),
                      ("act on some tokens only (aLoRA)", lambda c: c.alora_invocation_tokens is not None)):
        names = [n for n, c in configs.items() if hit(c)]
        if names:
            raise ValueError(f"adapters {names} {what}, which {where} cannot route or sum; use switch")


def _plain_only(configs: Mapping[str, LoraConfig], where: str) -> None:
    # A PiSSA / OLoRA / CorDA adapter acts on its own residual weights; one shared base holds none of them.
    residual = {n: c.init for n, c in configs.items() if c.changes_base}
    if residual:
        raise ValueError(f"adapters {residual} act on residual base weights of their own, which {where} over "
                         "one shared base cannot hold; convert them with lora_jax.to_plain first")
    kasa = [n for n, c in configs.items() if c.use_kasa]  # (nor can PEFT mix KaSA with other adapters)
    if kasa:
        raise ValueError(f"adapters {kasa} are KaSA: they act on a base truncated for their own ranks, which {where} "
                         "over one shared base cannot hold")
    ada = [n for n, c in configs.items() if c.adalora is not None]
    if ada:
        raise ValueError(f"adapters {ada} are AdaLoRA (singular values lora_E between A and B), which {where} does "
                         "not carry: convert them to plain LoRA with lora_jax.adalora.to_lora first")
    bd = [n for n, c in configs.items() if c.use_bdlora is not None]
    if bd:  # padding or stacking ranks would move the blocks that the config's mask keeps
        raise ValueError(f"adapters {bd} are BD-LoRA (block-diagonal factors), which {where} does not carry: "
                         "convert them to plain LoRA with lora_jax.bdlora.to_lora first")


def check_routable(configs: Mapping[str, LoraConfig], where: str) -> None:
    """Raise, naming the adapters, unless every config is a plain factor pair on the shared base
    (what per-example or per-token routing and sums can carry)."""
    _no_dora(configs, where)
    _factors_only(configs, where)
    _plain_only(configs, where)


def axes(configs: Mapping[str, LoraConfig], bank: Mapping[str, Adapters]) -> dict[str, tuple[int, int]]:
    """{path: (n_in, n_out)} over every adapted path, which the adapters targeting it must agree on."""
    out: dict[str, tuple[int, int]] = {}
    for n, c in configs.items():
        for p in bank[n]:
            got = c.axes_for(p)
            if out.setdefault(p, got) != got:
                raise ValueError(f"adapter {n!r} views {p!r} with axes_pattern {got}, another adapter with "
                                 f"{out[p]}: not the same matrix")
    return out


def _axes_pattern(configs: Mapping[str, LoraConfig], bank: Mapping[str, Adapters]) -> dict[str, tuple[int, int]]:
    """axes_pattern for a config over the union of the adapters' paths."""
    return {re.escape(p.rsplit("/", 1)[0]): v for p, v in axes(configs, bank).items() if v != (1, 1)}


def _check_factors(bank: Mapping[str, Adapters], present: Sequence[str], p: str) -> None:
    """Raise, naming the adapter, unless the factors at `p` of every adapter in `present` are
    lora_A [*S, in, r], lora_B [*S, r, out] with the first one's *S, in and out (one base)."""
    a0, b0 = bank[present[0]][p]["lora_A"], bank[present[0]][p]["lora_B"]
    for n in present:
        a, b = bank[n][p]["lora_A"], bank[n][p]["lora_B"]
        if (a.ndim < 2 or b.shape[:-1] != (*a.shape[:-2], a.shape[-1]) or a.shape[:-1] != a0.shape[:-1]
                or b.shape[-1] != b0.shape[-1]):
            raise ValueError(f"adapter {n!r} at {p!r}: lora_A {a.shape} / lora_B {b.shape} are not [*S, in, r] / "
                             f"[*S, r, out] with {present[0]!r}'s *S, in, out ({a0.shape} / {b0.shape}): "
                             "not the same base")


def stack(configs: Mapping[str, LoraConfig], bank: Mapping[str, Adapters]) -> Adapters:
    """Every adapter's factors stacked in `configs` order, per targeted path.

    Returns:
      {path: {"lora_A": [*S, N, in, r], "lora_B": [*S, N, r, out]}} with each adapter's scale
      folded into its A, ranks zero-padded to the largest, and zeros for adapters that do not
      target the path (a zero delta, exactly).
    """
    names = list(configs)
    paths = sorted(set().union(*(bank[n].keys() for n in names)))
    out: Adapters = {}
    for p in paths:
        present = [n for n in names if p in bank[n]]
        _check_factors(bank, present, p)
        a0, b0 = bank[present[0]][p]["lora_A"], bank[present[0]][p]["lora_B"]
        *stack_dims, d_in, _ = a0.shape
        d_out = b0.shape[-1]
        r = max(bank[n][p]["lora_A"].shape[-1] for n in present)
        dtype = jnp.result_type(*(bank[n][p][k] for n in present for k in ("lora_A", "lora_B")))
        As, Bs = [], []
        for n in names:
            if p not in bank[n]:
                As.append(jnp.zeros((*stack_dims, d_in, r), dtype))
                Bs.append(jnp.zeros((*stack_dims, r, d_out), dtype))
                continue
            a, b = bank[n][p]["lora_A"], bank[n][p]["lora_B"]
            pad = r - a.shape[-1]
            a = jnp.pad(a * configs[n].scale_for(p), [(0, 0)] * (a.ndim - 1) + [(0, pad)])  # [*S, in, r]
            b = jnp.pad(b, [(0, 0)] * (b.ndim - 2) + [(0, pad), (0, 0)])  # [*S, r, out]
            As.append(a.astype(dtype))
            Bs.append(b.astype(dtype))
        k = len(stack_dims)  # the adapter axis goes after the stack dims: scan slices those first
        out[p] = {"lora_A": jnp.stack(As, axis=k), "lora_B": jnp.stack(Bs, axis=k)}
    return out


def hotswappable(configs: Mapping[str, LoraConfig], bank: Mapping[str, Adapters], *,
                 rank: int | None = None) -> tuple[LoraConfig, dict[str, Adapters]]:
    """Every adapter in one shape, so one compiled function serves them all (PEFT's
    `prepare_model_for_compiled_hotswap` + `hotswap_adapter`, by construction).

    Returns (config, {name: adapters}): the union of the targeted paths at rank `rank` (default:
    the largest among the adapters), each adapter's scale folded into its A, zeros where it has
    no factors; config has scale 1 and no dropout (inference). `jax.jit(lj.apply(f, config))`
    then runs any of them without recompiling: swapping adapters is passing other arrays.
    Trained biases / modules (bias, trainable) stay in the params passed alongside.
    """
    configs = dict(configs)
    _no_dora(configs, "hotswappable")
    _factors_only(configs, "hotswappable")
    _plain_only(configs, "hotswappable")
    missing = [n for n in configs if n not in bank]
    if not configs or missing:
        raise ValueError(f"hotswappable needs adapters for every config; missing {missing}")
    stacked = stack(configs, bank)
    largest = max(ab["lora_A"].shape[-1] for ab in stacked.values())
    rank = largest if rank is None else rank
    if not isinstance(rank, int) or rank < largest:
        raise ValueError(f"rank={rank!r} is below the largest adapter rank {largest}: zero padding cannot shrink "
                         "an adapter (multi.combine(..., how='svd', rank=...) truncates one)")
    out: dict[str, Adapters] = {n: {} for n in configs}
    for p, ab in stacked.items():
        k = ab["lora_A"].ndim - 3  # the adapter axis, after the stack dims: a [*S, N, in, r]
        a = jnp.pad(ab["lora_A"], [(0, 0)] * (k + 2) + [(0, rank - ab["lora_A"].shape[-1])])
        b = jnp.pad(ab["lora_B"], [(0, 0)] * (k + 1) + [(0, rank - ab["lora_B"].shape[-2]), (0, 0)])
        for i, n in enumerate(configs):
            out[n][p] = {"lora_A": jnp.take(a, i, axis=k), "lora_B": jnp.take(b, i, axis=k)}
    config = LoraConfig(rank=rank, alpha=float(rank), targets=tuple(p.rsplit("/", 1)[0] for p in sorted(stacked)),
                        axes_pattern=_axes_pattern(configs, bank))
    return config, out


# ----------------------------------------------------------------------------- the transform


class MultiLora(NamedTuple):
    """Pure functions over `(params, bank, *args)`; `bank` is {name: adapters}.

    switch(params, bank, *args, adapter=None|name, lora_rng=None, **kw): one adapter, or the
      base model for None (make `adapter` static under jit: `static_argnames="adapter"`).
    mixed(params, bank, *args, adapter_ids, **kw): adapter_ids [B] int, indices into `names`;
      -1 or len(names) runs that example on the base.
    """

    names: tuple[str, ...]
    switch: Callable[..., Any]
    mixed: Callable[..., Any]

    def ids(self, adapters: Sequence[str | None]) -> np.ndarray:
        """Per-example adapter names (None or PEFT's "__base__": no adapter) -> int32 indices for `mixed`."""
        base = lambda a: a is None or (a == BASE and a not in self.names)  # noqa: E731
        unknown = sorted({a for a in adapters if not base(a) and a not in self.names})
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; known: {list(self.names)}")
        return np.array([-1 if base(a) else self.names.index(a) for a in adapters], np.int32)


def multi(f: Callable[..., Any], configs: Mapping[str, LoraConfig], *, strategy: str = "factored") -> MultiLora:
    """Several named adapters over one function `f(params, *args, **kw)`.

    Args:
      f: the model function (e.g. `model.apply`).
      configs: {name: LoraConfig}; its order fixes the indices used by `mixed`.
      strategy: how `switch` applies one adapter ("factored" or "merged"); `mixed` is always factored.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown LoRA strategy {strategy!r}; expected one of {STRATEGIES}")
    configs = dict(configs)
    _plain_only(configs, "multi")
    names = tuple(configs)
    single = {n: apply(f, c, strategy=strategy) for n, c in configs.items()}

    def switch(params, bank, *args, adapter: str | None = None, **kwargs):
        if adapter is None:
            kwargs.pop("lora_rng", None)
            kwargs.pop("lora_mask", None)
            return lift(f)(params, *args, **kwargs)
        if adapter not in single:
            raise ValueError(f"unknown adapter {adapter!r}; known: {list(names)}")
        return single[adapter](params, bank[adapter], *args, **kwargs)

    def mixed(params, bank, *args, adapter_ids, **kwargs):
        _no_dora(configs, "a mixed batch")
        _factors_only(configs, "a mixed batch")
        trains_full = [n for n, c in configs.items() if c.bias != "none" or c.trainable is not None]
        if trains_full:
            raise ValueError(f"adapters {trains_full} train full leaves (bias / trainable), which a mixed "
                             "batch cannot route per example; use switch with their params")
        for n in names:
            check_adapters(configs[n], params, bank[n])
        ids = jnp.asarray(adapter_ids, jnp.int32)
        if ids.ndim != 1:
            raise ValueError(f"adapter_ids must be [batch], got shape {ids.shape}")
        stacked, views = stack(configs, bank), axes(configs, bank)

        def swap(path, w):
            if path not in stacked:
                return w
            s = stacked[path]
            return as_matrix(lax.stop_gradient(w), *views[path], lambda view: MultiLoraArray(
                w=view, a=s["lora_A"], b=s["lora_B"], ids=jnp.broadcast_to(ids, (*view.shape[:-2], ids.shape[0])),
                name=path))
        return quaxify(f)(tree.map_with_path(swap, params), *args, **kwargs)

    return MultiLora(names, switch, mixed)


# ----------------------------------------------------------------------------- combining


def combine(configs: Mapping[str, LoraConfig], bank: Mapping[str, Adapters], weights: Mapping[str, float], *,
            how: str = "linear", rank: int | None = None, density: float | None = None,
            majority_sign: str = "total", clamp: float | None = None,
            key: jax.Array | None = None) -> tuple[LoraConfig, Adapters]:
    """One adapter from several, weighted: PEFT's `add_weighted_adapter`, scale 1 (alpha = r).

    how:
      linear: exactly sum_n weights[n] * delta_n, by rank concatenation: per path
        A = [w_1 s_1 A_1 | w_2 s_2 A_2 | ...], B = [B_1; B_2; ...] over the adapters present there.
      cat: the same sum in PEFT's `cat` layout: every path gets the sum of all adapters' ranks,
        the present factors first, zeros after.
      svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd: the deltas
        s_n A_n B_n merged by task arithmetic / TIES / DARE / magnitude pruning
        (`lora_jax.merging`), then truncated to `rank` by SVD (default: the largest rank among
        the adapters), optionally clipped at the `clamp` quantile (PEFT `svd_clamp`).
      ties, dare_linear, dare_ties, magnitude_prune: PEFT's merges of the factors themselves
        (A with weights sign(w s) sqrt|w s|, B with sqrt|w s|); the adapters present at a path
        must share its rank. A cheap approximation of the weighted delta sum.
    density: the fraction kept by TIES / DARE / magnitude pruning; majority_sign: `total` or
    `frequency` (TIES); key: DARE's random pruning. (PEFT's own `linear` sums the factors,
    A = sum sqrt(w s) A_n, which is not the weighted sum of the deltas; it is not offered.)
    """
    if how not in COMBINATIONS:
        raise ValueError(f"unknown combination {how!r}; expected one of {COMBINATIONS}")
    _no_dora({n: configs[n] for n in weights if n in configs}, "combine")
    _factors_only({n: configs[n] for n in weights if n in configs}, "combine")
    _plain_only({n: configs[n] for n in weights if n in configs}, "combine")
    names = list(weights)
    missing = [n for n in names if n not in bank or n not in configs]
    if not names or missing:
        raise ValueError(f"cannot combine {names}: unknown adapter(s) {missing}; known: {sorted(bank)}")
    kind = "linear" if how == "svd" else how.removesuffix("_svd")  # the merge rule, before any SVD
    _check_merge_args(how, kind, rank, density, majority_sign, clamp, key)
    paths = sorted(set().union(*(bank[n].keys() for n in names)))
    ranks_of = {n: max(ab["lora_A"].shape[-1] for ab in bank[n].values()) for n in names}
    out: Adapters = {}
    for i, p in enumerate(paths):
        present = [n for n in names if p in bank[n]]
        _check_factors(bank, present, p)
        sub = None if key is None else jax.random.fold_in(key, i)
        if how in ("linear", "cat"):
            out[p] = _concatenated(configs, bank, weights, present, p, sum(ranks_of.values()) if how == "cat" else None)
        elif how.endswith("svd"):
            out[p] = _svd(configs, bank, weights, present, p, rank or max(ranks_of.values()), kind,
                          dict(density=density, majority_sign=majority_sign, key=sub), clamp)
        else:
            out[p] = _factor_merge(configs, bank, weights, present, p, kind,
                                   dict(density=density, majority_sign=majority_sign), sub)
    ranks = {p: ab["lora_A"].shape[-1] for p, ab in out.items()}
    r0 = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank
    module = lambda p: re.escape(p.rsplit("/", 1)[0])
    config = LoraConfig(
        rank=r0, alpha=float(r0), targets=tuple(p.rsplit("/", 1)[0] for p in paths),
        rank_pattern={module(p): r for p, r in ranks.items() if r != r0},
        alpha_pattern={module(p): float(r) for p, r in ranks.items() if r != r0},
        axes_pattern=_axes_pattern({n: configs[n] for n in names}, {n: bank[n] for n in names}),
    )
    return config, out


def _check_merge_args(how, kind, rank, density, majority_sign, clamp, key) -> None:
    if rank is not None and not how.endswith("svd"):
        raise ValueError(f"rank={rank} sets the SVD rank; combination {how!r} does no SVD")
    if rank is not None and (not isinstance(rank, int) or rank <= 0):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    pruned = kind in merging.MERGES and kind != "linear"
    if pruned and (density is None or not 0 <= density <= 1 or (kind.startswith("dare") and density == 0)):
        raise ValueError(f"combination {how!r} needs density in {'(0' if kind.startswith('dare') else '[0'}, 1] "
                         f"(the fraction of entries kept), got {density!r}")
    if not pruned and density is not None:
        raise ValueError(f"density={density} prunes; combination {how!r} does not")
    if majority_sign not in merging.SIGN_METHODS:
        raise ValueError(f"majority_sign must be one of {merging.SIGN_METHODS}, got {majority_sign!r}")
    if clamp is not None and (not how.endswith("svd") or not 0 <= clamp <= 1):
        raise ValueError(f"clamp={clamp} is a quantile in [0, 1] of an SVD combination, not for {how!r}")
    if kind.startswith("dare") and key is None:
        raise ValueError(f"combination {how!r} prunes at random: pass key=jax.random.key(...)")


def _concatenated(configs, bank, weights, present, p, total: int | None) -> dict[str, jax.Array]:
    a = jnp.concatenate([bank[n][p]["lora_A"] * (weights[n] * configs[n].scale_for(p)) for n in present], -1)
    b = jnp.concatenate([bank[n][p]["lora_B"] for n in present], -2)  # a [*S, in, R], b [*S, R, out]
    if total is not None:  # cat: zeros up to the sum of every adapter's rank
        pad = total - a.shape[-1]
        a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)])
        b = jnp.pad(b, [(0, 0)] * (b.ndim - 2) + [(0, pad), (0, 0)])
    return {"lora_A": a, "lora_B": b}


def _svd(configs, bank, weights, present, p, rank: int, kind: str, kw, clamp) -> dict[str, jax.Array]:
    hi = jax.lax.Precision.HIGHEST
    deltas = jnp.stack([configs[n].scale_for(p) * jnp.matmul(bank[n][p]["lora_A"].astype(jnp.float32),
                                                             bank[n][p]["lora_B"].astype(jnp.float32), precision=hi)
                        for n in present])  # [N, *S, in, out]
    if rank > min(deltas.shape[-2:]):
        raise ValueError(f"SVD rank {rank} exceeds the {deltas.shape[-2]} x {deltas.shape[-1]} delta of {p!r}; "
                         "pass a smaller rank=")
    merged = merging.merge(kind, deltas, jnp.asarray([weights[n] for n in present], jnp.float32), **kw)
    a, b = merging.truncated_svd(merged, rank, clamp)
    dtype = bank[present[0]][p]["lora_A"].dtype
    return {"lora_A": a.astype(dtype), "lora_B": b.astype(dtype)}


def _factor_merge(configs, bank, weights, present, p, kind: str, kw, key) -> dict[str, jax.Array]:
    ranks = {n: bank[n][p]["lora_A"].shape[-1] for n in present}
    if len(set(ranks.values())) > 1:
        raise ValueError(f"combination {kind!r} merges the factors themselves, which needs one rank per path; "
                         f"{p!r} has ranks {ranks} (use an SVD combination)")
    ws = [weights[n] * configs[n].scale_for(p) for n in present]
    w_a = jnp.asarray([math.copysign(math.sqrt(abs(w)), w) for w in ws], jnp.float32)  # the sign on A only
    w_b = jnp.asarray([math.sqrt(abs(w)) for w in ws], jnp.float32)
    ka, kb = (None, None) if key is None else jax.random.split(key)
    a = merging.merge(kind, jnp.stack([bank[n][p]["lora_A"] for n in present]), w_a, key=ka, **kw)
    b = merging.merge(kind, jnp.stack([bank[n][p]["lora_B"] for n in present]), w_b, key=kb, **kw)
    return {"lora_A": a, "lora_B": b}


# ----------------------------------------------------------------------------- loading


class Bank(NamedTuple):
    """Named adapters loaded for one base: {name: config}, {name: adapters}, {name: extras}."""

    configs: dict[str, LoraConfig]
    adapters: dict[str, Adapters]
    extras: dict[str, dict[str, jax.Array]]


def load_bank(sources: Mapping[str, str | os.PathLike], params: PyTree, *, model_config: Any = None) -> Bank:
    """Load named adapters from lora_jax checkpoints or PEFT adapter directories (by content)."""
    from . import peft

    bank = Bank({}, {}, {})
    for name, src in sources.items():
        try:
            got = peft.load_adapter(src, params, model_config=model_config)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"adapter {name!r}: {e}") from None
        bank.configs[name], bank.adapters[name], bank.extras[name] = got.config, got.adapters, got.extras
    return bank
