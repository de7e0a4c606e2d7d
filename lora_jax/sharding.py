"""Fully sharded data parallelism (FSDP, ZeRO-3) over parameter pytrees.

Every large leaf (frozen weights, LoRA factors, optimizer moments, NF4 codes alike) is split over
one mesh axis along a dimension that axis divides, so each device holds about 1/n of it; inside
`jit`, XLA gathers a weight where a layer uses it and reduce-scatters its gradient. With the
batch sharded over the same axis this is FSDP; LoRA keeps working unchanged because the
transform only sees shapes, never placements.

    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
    params = jax.device_put(params, fsdp(params, mesh))

The mesh axis must be `Auto` (XLA propagates shardings through the model): `jax.make_mesh`
makes `Explicit` axes by default, under which an embedding lookup on a sharded table needs an
explicit output sharding.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

PyTree = Any
MIN_SIZE = 2**10  # smaller leaves (biases, norms) stay replicated: splitting them saves less than it costs


def fsdp_spec(shape: tuple[int, ...], n: int, *, axis: str = "data", min_size: int = MIN_SIZE) -> P:
    """The PartitionSpec that splits `shape` over `axis` (of size `n`) along its largest dimension
    that `n` divides; `P()` (replicated) for small leaves or when no dimension divides.

    The leading dimension of a leaf with 3 or more dimensions is a layer stack ([L, in, out],
    [L, in, r]) that `lax.scan` slices per step, so it is never the one split.
    """
    if n <= 1 or math.prod(shape) < min_size:
        return P()
    dims = range(1 if len(shape) >= 3 else 0, len(shape))
    best = max((d for d in dims if shape[d] % n == 0), key=lambda d: (shape[d], d), default=None)
    if best is None:
        return P()
    return P(*(axis if d == best else None for d in range(len(shape))))


def fsdp(tree: PyTree, mesh: Mesh, *, axis: str = "data", min_size: int = MIN_SIZE) -> PyTree:
    """A tree of `NamedSharding`s shaped like `tree` (arrays, `ShapeDtypeStruct`s, `QuantizedArray`s'
    parts, None holes kept) that shards each leaf by `fsdp_spec` over `mesh`'s `axis`.

    Use it with `jax.device_put(tree, fsdp(tree, mesh))`, or as a `jit` `in_shardings` /
    `out_shardings` entry so that a train step's outputs stay sharded as its inputs were.
    """
    if axis not in mesh.shape:
        raise ValueError(f"mesh has no axis {axis!r}; its axes are {tuple(mesh.shape)}")
    kind = dict(zip(mesh.axis_names, mesh.axis_types))[axis]
    if kind != AxisType.Auto:
        raise ValueError(f"mesh axis {axis!r} is {kind}: FSDP needs an Auto axis, e.g. jax.make_mesh(..., "
                         "axis_types=(jax.sharding.AxisType.Auto,)) or jax.sharding.Mesh(devices, names)")
    n = mesh.shape[axis]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), n, axis=axis, min_size=min_size)),
                        tree)


def bytes_per_device(tree: PyTree) -> int:
    """The most bytes any one device holds of the placed arrays in `tree`."""
    per: dict[Any, int] = {}
    for x in jax.tree.leaves(tree):
        for s in x.addressable_shards:
            per[s.device] = per.get(s.device, 0) + s.data.nbytes
    return max(per.values(), default=0)
