"""Arrow: per-token routing over a library of LoRA adapters (Ostapenko et al. 2024; PEFT's
`ArrowConfig` / `create_arrow_model`), with GenKnowSub (Belanec et al. 2025).

    router = arrow_router(configs, bank, general_configs, general_bank)   # once, jittable
    router = load_router(["task_a/", "task_b/", "task_c/"], params, general=["gen/"])  # from files
    g = apply_arrow(model.apply, ArrowConfig(top_k=3))
    logits = jax.jit(g)(params, router, input_ids)

Each adapter's delta on a matrix, A B [in, out], gets a prototype: its top left singular vector,
the input direction it amplifies most (PEFT's top right singular vector of its (out, in) delta,
which PEFT estimates by power iteration and lora_jax computes exactly, from a QR of A and an
SVD of an r x out matrix). Per token x and matrix, the adapters' scores are |x . prototype|; the
`top_k` best are weighted by a softmax of score / temperature and the layer computes
x W0 + sum_e c_e(x) s_e (x A_e) B_e, still factored. GenKnowSub first subtracts the mean lora_A
and the mean lora_B of some general-knowledge adapters from every task adapter's factors, as PEFT
does. Arrow mixes adapters at inference; nothing in it trains.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import quax
from jax import lax
from jax.extend.core import primitives as P

from . import tree
from .config import LoraConfig
from .lazy import FallbackError, StackedFactors, dense, lift, quaxify
from .lora import Adapters
from .multi import check_routable, load_bank

PyTree = Any
ArrayLike = jax.typing.ArrayLike
PROTOTYPES = "prototypes"  # [*S, E, in]: each adapter's routing direction


@dataclasses.dataclass(frozen=True)
class ArrowConfig:
    """PEFT's ArrowConfig: how many adapters each token mixes, and the softmax temperature."""

    top_k: int = 3
    router_temperature: float = 1.0

    def __post_init__(self):
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k <= 0:
            raise ValueError(f"ArrowConfig.top_k must be a positive integer, got {self.top_k!r}")
        t = self.router_temperature
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not (math.isfinite(t) and t > 0):
            raise ValueError(f"ArrowConfig.router_temperature must be a positive number, got {t!r}")


def prototype(a: jax.Array, b: jax.Array) -> jax.Array:
    """The unit top left singular vector [in] of A B, for A [in, r], B [r, out] (fp32), without
    forming A B: A = Q R, and Q times the top left singular vector of R B [r, out]."""
    q, rr = jnp.linalg.qr(a)  # [in, r], [r, r]
    u, _, _ = jnp.linalg.svd(rr @ b, full_matrices=False)  # [r, r]
    return q @ u[:, 0]


def _check_library(configs: Mapping[str, LoraConfig], bank: Mapping[str, Adapters], what: str) -> None:
    if set(configs) != set(bank) or not configs:
        raise ValueError(f"arrow_router: {what} configs {sorted(configs)} and adapters {sorted(bank)} must name the "
                         "same adapters, at least one")
    check_routable(configs, "Arrow")


def arrow_router(configs: Mapping[str, LoraConfig], bank: Mapping[str, Adapters],
                 general_configs: Mapping[str, LoraConfig] | None = None,
                 general_bank: Mapping[str, Adapters] | None = None) -> Adapters:
    """What `apply_arrow` routes over: the task adapters stacked, GenKnowSub applied, prototypes made.

    Args:
      configs, bank: the task adapters {name: config}, {name: adapters} (e.g. `multi.load_bank`'s):
        one rank and the same adapted linear weights for all, as PEFT's Arrow requires.
      general_configs, general_bank: general-knowledge adapters for GenKnowSub (PEFT's
        `use_gks=True` with `general_adapter_paths`), of that rank and those weights too.
    Returns:
      {path: {"lora_A": [*S, E, in, r] (each adapter's scale folded in), "lora_B": [*S, E, r, out],
      "prototypes": [*S, E, in]}}, E the task adapters in `configs` order.
    """
    _check_library(configs, bank, "task")
    names = list(configs)
    library = {n: (configs[n], bank[n]) for n in names}
    general = []
    if general_configs is not None or general_bank is not None:
        _check_library(general_configs or {}, general_bank or {}, "general")
        general = list(general_configs)
        library |= {f"general {n}": (general_configs[n], general_bank[n]) for n in general}
    paths = sorted(bank[names[0]])
    ref = {p: (bank[names[0]][p]["lora_A"].shape, bank[names[0]][p]["lora_B"].shape) for p in paths}
    for n, (c, ab) in library.items():
        if sorted(ab) != paths:
            raise ValueError(f"arrow_router: adapter {n!r} adapts {sorted(ab)[:4]}, {names[0]!r} adapts {paths[:4]}: "
                             "Arrow needs the same weights in every adapter")
        for p in paths:
            got = (ab[p]["lora_A"].shape, ab[p]["lora_B"].shape)
            if got != ref[p]:
                raise ValueError(f"arrow_router: adapter {n!r} at {p!r} has lora_A / lora_B {got}, {names[0]!r} "
                                 f"{ref[p]}: Arrow needs one rank and the same shapes in every adapter")
            if tree.leaf_name(p) not in tree.LINEAR_NAMES or c.axes_for(p) != (1, 1):
                raise ValueError(f"arrow_router: {p!r} is not a linear layer's [*S, in, out] kernel; Arrow routes "
                                 "linear layers only")
    out: Adapters = {}
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    for p in paths:
        a = jnp.stack([f32(bank[n][p]["lora_A"]) for n in names])  # [E, *S, in, r]
        b = jnp.stack([f32(bank[n][p]["lora_B"]) for n in names])  # [E, *S, r, out]
        if general:  # GenKnowSub: the general adapters' mean factors subtracted from each task adapter's
            a = a - jnp.mean(jnp.stack([f32(general_bank[n][p]["lora_A"]) for n in general]), axis=0)
            b = b - jnp.mean(jnp.stack([f32(general_bank[n][p]["lora_B"]) for n in general]), axis=0)
        *stack, d_in, r = a.shape[1:]
        flat_a, flat_b = a.reshape(-1, d_in, r), b.reshape(-1, r, b.shape[-1])  # [E * prod(S), ...]
        with jax.default_matmul_precision("highest"):
            protos = jax.vmap(prototype)(flat_a, flat_b).reshape(len(names), *stack, d_in)  # [E, *S, in]
        scale = jnp.asarray([configs[n].scale_for(p) for n in names], jnp.float32)
        a = a * scale.reshape((-1,) + (1,) * (a.ndim - 1))
        k = len(stack)  # the adapter axis after the stack dims, where a scan over layers leaves it
        out[p] = {"lora_A": jnp.moveaxis(a, 0, k), "lora_B": jnp.moveaxis(b, 0, k),
                  PROTOTYPES: jnp.moveaxis(protos, 0, k)}
    return out


def load_router(tasks: Sequence[str | os.PathLike], params: PyTree, *,
                general: Sequence[str | os.PathLike] = (), model_config: Any = None) -> Adapters:
    """`arrow_router` over adapter directories (PEFT's or lora_jax's, or PEFT hub ids), as PEFT's
    `create_arrow_model(base, task_specific_adapter_paths, ..., general_adapter_paths)` loads them;
    GenKnowSub when `general` names any. Fully trained leaves the adapters carry are refused."""
    bank = load_bank({f"task_{i}": s for i, s in enumerate(tasks)} | {f"gks_{i}": s for i, s in enumerate(general)},
                     params, model_config=model_config)
    extras = sorted(n for n, e in bank.extras.items() if e)
    if extras:
        raise ValueError(f"load_router: adapters {extras} also train full leaves (biases, modules), which Arrow's "
                         "routed deltas cannot carry")
    pick = lambda prefix, d: {n: v for n, v in d.items() if n.startswith(prefix)}  # noqa: E731
    gks = pick("gks_", bank.configs)
    return arrow_router(pick("task_", bank.configs), pick("task_", bank.adapters), gks or None,
                        pick("gks_", bank.adapters) if gks else None)


class ArrowArray(StackedFactors):
    """W0 [*S, in, out] with E routed adapters: a [*S, E, in, r] (scales folded in), b [*S, E, r, out],
    prototypes [*S, E, in]. Only x @ W (x contracting `in`) has a meaning: the mix is per token."""

    w: Any
    a: jax.Array
    b: jax.Array
    protos: jax.Array
    top_k: int = eqx.field(static=True)
    temperature: float = eqx.field(static=True)
    name: str = eqx.field(static=True)

    def materialise(self) -> jax.Array:
        raise FallbackError(f"Arrow-routed weight {self.name!r} {tuple(self.w.shape)} mixes its adapters per token: "
                            "it has no single weight, and may only be the right operand of x @ W over its input dim")

    def cast(self, fn) -> "ArrowArray":
        return eqx.tree_at(lambda t: t.protos, super().cast(fn), fn(self.protos))

    def map(self, fn) -> "ArrowArray":
        """Apply a stack-dimension op (a scan's slice) to every leaf."""
        return eqx.tree_at(lambda t: (t.w, t.a, t.b, t.protos), self,
                           (lift(fn)(self.w), fn(self.a), fn(self.b), fn(self.protos)))


@quax.register(P.dot_general_p)
def _dot_arrow(lhs: ArrayLike | quax.ArrayValue, rhs: ArrowArray, *, dimension_numbers, **kwargs):
    x, m = dense(lhs), rhs
    (xc, wc), (xb, wb) = dimension_numbers
    if m.w.ndim != 2 or xb or wb or tuple(wc) != (0,):
        return m.materialise()  # raises
    base = lift(lax.dot_general)(x, m.w, dimension_numbers, **kwargs)  # [*x_free, out]
    xm = jnp.moveaxis(x, xc[0], -1)  # [*x_free, in]
    n = m.protos.shape[0]
    sim = jnp.abs(xm.astype(jnp.float32) @ m.protos.astype(jnp.float32).T)  # [*x_free, E]
    top = lax.top_k(sim, m.top_k)[1]  # [*x_free, k]
    chosen = jnp.any(top[..., :, None] == jnp.arange(n), axis=-2)  # [*x_free, E]
    coeff = jax.nn.softmax(jnp.where(chosen, sim / m.temperature, -jnp.inf), axis=-1)  # [*x_free, E]
    t = jnp.einsum("...i,eir->...er", xm, m.a.astype(x.dtype))  # [*x_free, E, r]
    u = jnp.einsum("...er,ero->...o", t * coeff[..., None].astype(t.dtype), m.b.astype(x.dtype))  # [*x_free, out]
    return base + u.astype(base.dtype)


def apply_arrow(f: Callable[..., Any], arrow: ArrowConfig = ArrowConfig()) -> Callable[..., Any]:
    """Turn `f(params, *args, **kw)` into `g(params, router, *args, **kw)`, each weight in `router`
    (`arrow_router`'s) mixing its adapters per token; W0 is under `stop_gradient`."""
    def g(params, router, *args, **kwargs):
        flat = tree.flatten(params)
        for p, ab in router.items():
            (*stack, e, d_in, _), d_out = ab["lora_A"].shape, ab["lora_B"].shape[-1]  # [*S, E, in, r], [.., out]
            if p not in flat or tuple(flat[p].shape) != (*stack, d_in, d_out):
                raise ValueError(f"Arrow router at {p!r} (lora_A {tuple(ab['lora_A'].shape)}) does not fit the "
                                 f"parameter {tuple(flat[p].shape) if p in flat else 'missing'}")
            if arrow.top_k > e:
                raise ValueError(f"ArrowConfig.top_k={arrow.top_k} exceeds the {e} adapters of the router")

        def swap(path, w):
            if path not in router:
                return w
            ab = router[path]
            return ArrowArray(w=lax.stop_gradient(w), a=ab["lora_A"], b=ab["lora_B"], protos=ab[PROTOTYPES],
                              top_k=arrow.top_k, temperature=float(arrow.router_temperature), name=path)
        return quaxify(f)(tree.map_with_path(swap, params), *args, **kwargs)

    return g
