"""The lazy value W0 + s*A*B, as a quax array, and the rules that keep it factored.

Inside `quax.quaxify`, a `LoraArray` stands where a kernel W0 was. Rules registered here handle
the primitives a kernel meets on its way to a matmul:

* `dot_general` with W on either side, contracting its input or output dimension, with or
  without batch dimensions: computes x*W0 + s*((drop(x)*A)*B), never the d x k product;
* `gather` of whole rows (an embedding lookup): W0[i] + s*A[i]*B; a tied LM head is a
  `dot_general` contracting W's output dimension, so an adapted embedding stays factored;
* `convert_element_type` (casts W0, A and B), `transpose` of the two matrix dimensions
  (W^T = W0^T + s*B^T*A^T), slicing and squeezing of leading stack dimensions (layer stacks
  indexed by a loop), and `jax.checkpoint` (re-quaxifies its body under the same policy);
* a kernel of several input or output axes [*S, *I, *O] (Flax DenseGeneral; `Reshaped`) keeps
  its LoRA on the matrix [*S, prod(I), prod(O)]: a matmul over all of I (or O) merges those
  axes of x and runs on that matrix; a convolution kernel [*spatial, in, out] viewed as
  [prod(spatial, in), out] convolves x with A (r channels), then applies B per position;
* everything else materialises W0 + s*A*B (`Value.default`), or raises under `strict=True`.
* a `jax.custom_vjp` function (quax has no rule for one: cuDNN attention, a user's kernel) runs on
  plain arrays under the parent trace, and a `jax.custom_jvp` one taking a value of ours gets it
  materialised, both through `_patch_quax_trace`.

W0 is wrapped in `stop_gradient` when the array is built, so no frozen-weight gradient exists.
W0 may itself be a quax value (`quant.QuantizedArray`, 4-bit): the rules reach it through `lift`,
so it stays quantized through stack slicing and casts and dequantizes inside its own matmul rule.
Only public JAX APIs (`jax.extend`); from quax, `register`/`quaxify` and, for the custom-derivative
calls it lacks, its trace class (`quax._trace._QuaxTrace`, patched once, stepping aside where quax
has its own custom_vjp rule).
"""

from __future__ import annotations

import abc
import functools
import math
import warnings
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.extend.core as jexc
import jax.numpy as jnp
import quax
from jax import lax
from jax.extend.core import primitives as P

from . import tree
from .velora import velora_matmul

ArrayLike = jax.typing.ArrayLike


class FallbackError(RuntimeError):
    """A LoRA-adapted weight met an operation with no factored rule while `strict=True`."""


def dense(x: Any) -> Any:
    """x as a JAX array: a quax value (a quantized W0, quax's wrapper of a plain operand) is
    materialised; anything else is returned as is."""
    return x.materialise() if tree.is_value(x) else x


def quaxify(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`quax.quaxify(fn)`, handed the arguments' leaves: quax rebuilds the argument and output
    pytrees where no JAX trace is current, which nodes that record their trace when built refuse
    (flax 0.12.10's nnx Variables under JAX 0.11), so `fn`'s pytrees are rebuilt inside the trace."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        leaves, treedef = jax.tree.flatten((args, kwargs), is_leaf=tree.is_value)
        out_def = []

        def flat(*leaves):
            a, k = jax.tree.unflatten(treedef, leaves)
            out, d = jax.tree.flatten(fn(*a, **k))
            out_def.append(d)
            return out
        out = quax.quaxify(flat)(*leaves)
        return jax.tree.unflatten(out_def[-1], out)
    return run


def lift(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` run through quax when its arguments hold quax values (a quantized W0, in a LoraArray
    or in a params tree), so their rules apply; called as is otherwise."""
    def run(*args, **kwargs):
        if any(tree.is_value(x) for x in jax.tree.leaves(args, is_leaf=tree.is_value)):
            return quaxify(fn)(*args, **kwargs)
        return fn(*args, **kwargs)
    return run


class Stacked(quax.ArrayValue):
    """An array value [*S, in, out]: a stack [*S] of matrices (layers under scan) in some form.

    The rules below slice or squeeze the stack dims (a loop over layers) through `map`; an op
    on the matrix dims goes to `materialise` (which may raise). `LoraArray`,
    `multi.MultiLoraArray` and `quant.QuantizedArray` build on this.
    """

    @abc.abstractmethod
    def map(self, fn: Callable[[jax.Array], jax.Array]) -> "Stacked":
        """Apply an op on the leading stack dims to every leaf that has them."""

    @property
    def n_stack(self) -> int:
        """How many leading dims are the stack [*S]."""
        return self.ndim - 2


class StackedFactors(Stacked):
    """A frozen kernel w [*S, in, out] and low-rank factors a, b that share its stack dims [*S].

    w may itself be a quax value (a `quant.QuantizedArray`): it is then used through `lift`.
    Casts go to the float leaves through `cast`.
    """

    w: eqx.AbstractVar[Any]
    a: eqx.AbstractVar[jax.Array]
    b: eqx.AbstractVar[jax.Array]

    def aval(self):
        return jax.core.ShapedArray(self.w.shape, self.w.dtype)

    def cast(self, fn: Callable[[jax.Array], jax.Array]) -> "StackedFactors":
        """Apply a dtype cast to the float leaves (not dropout keys or adapter indices)."""
        return eqx.tree_at(lambda t: (t.w, t.a, t.b), self, (lift(fn)(self.w), fn(self.a), fn(self.b)))


class LoraArray(StackedFactors):
    """W0 + scale * A @ B over stacks: w [*S, in, out], a [*S, in, r], b [*S, r, out].

    `key` ([*S] typed PRNG keys) enables dropout (rate `dropout`) on the matmul input of the
    LoRA path; None disables it. With a DoRA magnitude `m` [*S, out] the value is
    m * (W0 + s*A*B) / ||W0 + s*A*B|| (norms over `in`, outside the gradient, as in PEFT).
    `mask` ([*S, B, T] bools, the same for every matrix of the stack) limits the LoRA path to
    those tokens of a matmul's input (aLoRA); the value then has no single weight to stand for.
    """

    w: Any  # a jax.Array, or a quax value such as quant.QuantizedArray
    a: jax.Array
    b: jax.Array
    key: jax.Array | None
    m: jax.Array | None
    mask: jax.Array | None
    scale: float = eqx.field(static=True)
    dropout: float = eqx.field(static=True)
    strict: bool = eqx.field(static=True)
    name: str = eqx.field(static=True)
    velora: tuple[int, float] | None = eqx.field(static=True, default=None)  # VeLoRA's (groups, scale)
    velora_v: jax.Array | None = None  # VeLoRA's fixed projection [ceil(in/G)] (None: each batch's mean)

    def delta(self) -> jax.Array:
        """scale * A @ B, materialised (only the fallback needs it)."""
        ab = jnp.einsum("...ir,...ro->...io", self.a, self.b)  # [*S, in, out]
        return (self.scale * ab).astype(self.w.dtype)

    def materialise(self) -> jax.Array:
        if self.mask is not None:
            raise FallbackError(
                f"LoRA weight {self.name!r} {tuple(self.w.shape)} acts on some tokens only (lora_mask) and met "
                "an operation with no factored rule: no single weight W0 + s*A*B stands for it"
            )
        if self.strict:
            raise FallbackError(
                f"LoRA weight {self.name!r} {tuple(self.w.shape)} met an operation with no factored "
                "rule; pass strict=False to materialise W0 + s*A*B for it"
            )
        w = dense(self.w) + self.delta()
        return w if self.m is None else dora_weight(w, self.m)

    def dora_gain(self) -> jax.Array:
        """m / ||W0 + s*A*B|| [*S, out] (fp32) without forming the sum: per output column o,
        ||w_o||^2 + 2s <w_o, (AB)_o> + s^2 b_o^T (A^T A) b_o."""
        f32 = jnp.float32
        w, a, b, s = dense(self.w).astype(f32), self.a.astype(f32), self.b.astype(f32), self.scale
        w2 = jnp.sum(w * w, axis=-2)  # [*S, out]
        cross = jnp.einsum("...or,...ro->...o", jnp.einsum("...io,...ir->...or", w, a), b)  # [*S, out]
        ab2 = jnp.einsum("...ro,...rq,...qo->...o", b, jnp.einsum("...ir,...iq->...rq", a, a), b)  # [*S, out]
        norm = jnp.sqrt(jnp.maximum(w2 + 2 * s * cross + s * s * ab2, 0.0))
        return self.m.astype(f32) / lax.stop_gradient(norm)

    def cast(self, fn) -> "LoraArray":
        out = super().cast(fn)
        return out if self.m is None else eqx.tree_at(lambda t: t.m, out, fn(self.m))  # DoRA's magnitude too

    def map(self, fn) -> "LoraArray":
        """Apply a stack-dimension op (slice, squeeze, ...) to w, a, b, m, the dropout keys [*S] and the
        token mask [*S, B, T]."""
        opt = lambda v: None if v is None else fn(v)  # noqa: E731
        return eqx.tree_at(lambda t: (t.w, t.a, t.b, t.key, t.m, t.mask), self,
                           (lift(fn)(self.w), fn(self.a), fn(self.b), opt(self.key), opt(self.m), opt(self.mask)),
                           is_leaf=lambda x: x is None)

    def token_mask(self, x_free: tuple[int, ...], before: int, after: int) -> jax.Array:
        """`mask` [B, T] placed on a matmul output whose input's free dims are `x_free`, with
        `before` dims ahead of them and `after` behind: [1.., B, T, 1..] (or [1.., B*T, 1..])."""
        m = self.mask.reshape((-1, *self.mask.shape[self.n_stack:]))[0]  # every stacked matrix holds the same
        if tuple(x_free[: m.ndim]) == m.shape:
            lead = m
        elif len(x_free) == 1 and x_free[0] == m.size:  # tokens flattened: [B*T, D]
            lead = m.reshape(-1)
        else:
            raise ValueError(f"lora_mask {tuple(m.shape)} does not line up with the tokens of the input of "
                             f"{self.name!r} (its free dims {tuple(x_free)}): pass [batch, tokens] of that input, "
                             "and run every layer on all tokens (CausalLM.apply with positions=: trim_last_layer=False)")
        return lead.reshape((1,) * before + lead.shape + (1,) * (len(x_free) - lead.ndim + after))


class Reshaped(Stacked):
    """A kernel [*S, *I, *O] with several input or output axes (Flax `DenseGeneral`) whose adapted
    form is the matrix stack `inner` [*S, prod(I), prod(O)] (a `LoraArray`, or a mixed batch's).

    A matmul that contracts all of I (or all of O) merges those axes of x into one and runs on
    `inner`, so it stays factored; other uses reshape `inner.materialise()`.
    """

    inner: Stacked
    in_shape: tuple[int, ...] = eqx.field(static=True)
    out_shape: tuple[int, ...] = eqx.field(static=True)

    def aval(self):
        shape = (*self.inner.shape[: self.inner.n_stack], *self.in_shape, *self.out_shape)
        return jax.core.ShapedArray(shape, self.inner.dtype)

    @property
    def n_stack(self) -> int:
        return self.inner.n_stack

    def materialise(self) -> jax.Array:
        return self.inner.materialise().reshape(self.shape)

    def map(self, fn) -> "Reshaped":
        return eqx.tree_at(lambda t: t.inner, self, self.inner.map(fn))


def as_matrix(w: Any, n_in: int, n_out: int, wrap: Callable[[Any], Stacked]) -> Any:
    """`wrap(w viewed as [*S, prod(in), prod(out)])`, returned in w's own shape [*S, *in, *out]
    (a `Reshaped` when the two differ)."""
    s = w.ndim - n_in - n_out
    in_shape, out_shape = tuple(w.shape[s : s + n_in]), tuple(w.shape[s + n_in :])
    if n_in == 1 and n_out == 1:
        return wrap(w)
    view = (*w.shape[:s], math.prod(in_shape), math.prod(out_shape))
    return Reshaped(wrap(lift(lambda v: v.reshape(view))(w)), in_shape, out_shape)


def column_norms(w: jax.Array) -> jax.Array:
    """||w[..., :, o]|| for w [*S, in, out]: [*S, out] in fp32 (DoRA's magnitude at init)."""
    return jnp.linalg.norm(jnp.asarray(w, jnp.float32), axis=-2)


def dora_weight(w: jax.Array, m: jax.Array) -> jax.Array:
    """DoRA's weight from the adapted one, w [*S, in, out] and m [*S, out]: m * w / ||w|| per
    output column, the norm held constant for the gradient (PEFT, after the DoRA paper, 4.3)."""
    gain = m.astype(jnp.float32) / lax.stop_gradient(column_norms(w))  # [*S, out]
    return (w * gain[..., None, :]).astype(w.dtype)


def _dropout(x: jax.Array, lhs: LoraArray) -> jax.Array:
    if lhs.key is None or lhs.dropout == 0.0:
        return x
    # One key per stacked matrix; a stack that reaches a matmul unsliced shares the first.
    key = lhs.key.reshape(-1)[0]
    keep = jax.random.bernoulli(key, 1.0 - lhs.dropout, x.shape)
    return jnp.where(keep, x / (1.0 - lhs.dropout), 0).astype(x.dtype)


def _factored(lora: LoraArray, x: jax.Array, dn, kwargs, *, lora_is_lhs: bool):
    """dot_general(lora, x) or dot_general(x, lora) without forming A @ B; None if unsupported."""
    (lc, rc), (lb, rb) = dn
    wc, xc, wb, xb = (lc, rc, lb, rb) if lora_is_lhs else (rc, lc, rb, lb)
    n = lora.w.ndim
    stack = tuple(range(n - 2))
    if len(wc) != 1 or wc[0] < n - 2 or not set(wb) <= set(stack):
        return None  # contracts both matrix dims, or batches over one: no factored form
    if lora.m is not None and wb:
        return None  # DoRA's gain is per output column: factored only without batch dims
    if lora.m is not None and wc[0] == n - 1:
        # x . (W g)^T, a tied head's use of a DoRA embedding: (x g) . W^T, then the plain rule (one
        # gain per contracted column: a single matrix only, not a stack).
        if n != 2:
            return None
        g = lora.dora_gain().astype(x.dtype)
        gx = jnp.moveaxis(jnp.moveaxis(x, xc[0], -1) * g, -1, xc[0])
        plain = eqx.tree_at(lambda t: t.m, lora, replace=None)
        return _factored(plain, gx, dn, kwargs, lora_is_lhs=lora_is_lhs)
    # Contracting the input dim: x.(A B) = (x.A).B; the output dim: x.(A B)^T = (x.B^T).A^T.
    first, second, rank_dim = (lora.a, lora.b, n - 2) if wc[0] == n - 2 else (lora.b, lora.a, n - 1)
    dn_xw = ((xc, wc), (xb, wb))  # canonical: x on the left
    base = lift(lax.dot_general)(x, lora.w, dn_xw, **kwargs)  # [*batch, *x_free, *stack_free, o]
    kw = {k: v for k, v in kwargs.items() if k != "preferred_element_type"}
    xd = _dropout(x, lora)
    if lora.velora is None:
        t = lax.dot_general(xd, first.astype(x.dtype), dn_xw, **kw)  # [*batch, *x_free, *stack_free, r]
    elif n == 2 and wc[0] == 0 and not xb:  # x @ A, its input kept compressed for A's gradient
        t = velora_matmul(jnp.moveaxis(xd, xc[0], -1), first.astype(x.dtype), lora.velora_v,
                          *lora.velora)  # [*x_free, r]
    else:
        raise ValueError(f"VeLoRA compresses the input of x @ A for one matrix; {lora.name!r} "
                         f"{tuple(lora.w.shape)} is used {'transposed' if wc[0] == n - 1 else 'as a stack'} here")
    nbatch, n_xfree = len(wb), x.ndim - len(xc) - len(xb)
    stack_free = [d for d in stack if d not in wb]
    k = len(stack_free)
    # Contract r with `second`, batching every stack dim of the weight with its place in t.
    t_batch = tuple(range(nbatch)) + tuple(range(nbatch + n_xfree, nbatch + n_xfree + k))
    s_batch = tuple(wb) + tuple(stack_free)
    u = lax.dot_general(t, second.astype(t.dtype), (((t.ndim - 1,), (rank_dim,)), (t_batch, s_batch)), **kw)
    # u: [*batch, *stack_free, *x_free, o] -> [*batch, *x_free, *stack_free, o] like `base`.
    perm = (*range(nbatch), *range(nbatch + k, nbatch + k + n_xfree), *range(nbatch, nbatch + k), u.ndim - 1)
    lora_out = (lora.scale * lax.transpose(u, perm)).astype(base.dtype)
    if lora.mask is not None:  # [*batch, *x_free, *stack_free, o]: the LoRA path on the masked tokens only
        x_free = tuple(x.shape[d] for d in range(x.ndim) if d not in xc and d not in xb)
        lora_out = jnp.where(lora.token_mask(x_free, nbatch, k + 1), lora_out, jnp.zeros((), lora_out.dtype))
    if lora.m is None:
        out = base + lora_out
    else:  # out is [*x_free, *S, o] here, so the gain [*S, o] broadcasts from the right
        g = lora.dora_gain().astype(base.dtype)
        if xd is x:
            out = g * (base + lora_out)
        else:  # PEFT under dropout: x W0 + (g - 1) * drop(x) W0 + g * s * drop(x) A B
            out = base + (g - 1) * lift(lax.dot_general)(xd, lora.w, dn_xw, **kwargs) + g * lora_out
    if lora_is_lhs:
        # dot_general(w, x) is [*batch, *w_free, *x_free]; we built [*batch, *x_free, *w_free].
        perm = (*range(nbatch), *range(nbatch + n_xfree, out.ndim), *range(nbatch, nbatch + n_xfree))
        out = lax.transpose(out, perm)
    return out


def _dot(lhs, rhs, dimension_numbers, kwargs, lora_is_lhs):
    lora, x = (lhs, rhs) if lora_is_lhs else (rhs, lhs)
    if isinstance(x, LoraArray):  # W.W' : keep one factored, materialise the other
        x = x.materialise()
    out = _factored(lora, x, dimension_numbers, kwargs, lora_is_lhs=lora_is_lhs)
    if out is None:
        _check_stack_contraction(lora, dimension_numbers[0][0 if lora_is_lhs else 1])
        w = lora.materialise()
        args = (w, x) if lora_is_lhs else (x, w)
        return lax.dot_general_p.bind(*args, dimension_numbers=dimension_numbers, **kwargs)
    return out


def _check_stack_contraction(lora: LoraArray, contracted) -> None:
    """A matmul over a dim taken for a layer stack means a kernel of several input or output axes
    (a Flax DenseGeneral [D, H, Dh]) adapted as a stack of small matrices: say how to fix it."""
    dims = [d for d in contracted if d < lora.n_stack]
    if not dims:
        return
    msg = (f"LoRA weight {lora.name!r} {tuple(lora.shape)} is contracted over dim(s) {dims}, which lora_jax took "
           "for a layer stack: a kernel with several input or output axes needs LoraConfig.axes_pattern "
           "({pattern: (n_in, n_out)}; FLAX_ATTENTION_AXES for Flax attention) to be adapted as one matrix")
    if lora.strict:
        raise FallbackError(msg)
    warnings.warn(msg + "; materialising W0 + s*A*B for this matmul", stacklevel=2)


def _dense(x):
    # quax hands plain operands to rules as its own dense wrapper; unwrap to a JAX array.
    return dense(x) if not isinstance(x, LoraArray) else x


@quax.register(P.dot_general_p)
def _dot_lora_lhs(lhs: LoraArray, rhs: ArrayLike | quax.ArrayValue, *, dimension_numbers, **kwargs):
    return _dot(lhs, _dense(rhs), dimension_numbers, kwargs, True)


@quax.register(P.dot_general_p)
def _dot_lora_rhs(lhs: ArrayLike | quax.ArrayValue, rhs: LoraArray, *, dimension_numbers, **kwargs):
    return _dot(_dense(lhs), rhs, dimension_numbers, kwargs, False)


@quax.register(P.dot_general_p, precedence=1)
def _dot_lora_both(lhs: LoraArray, rhs: LoraArray, *, dimension_numbers, **kwargs):
    return _dot(lhs, rhs, dimension_numbers, kwargs, True)


@quax.register(P.gather_p)
def _gather(operand: LoraArray, indices: ArrayLike | quax.ArrayValue, *, dimension_numbers, slice_sizes,
            **kwargs):
    # An embedding lookup, rows of W [V, D]: W0[i] + s * A[i] @ B, as PEFT's Embedding computes
    # it (no dropout there either). Gathering A instead of W keeps the [V, D] product unbuilt.
    dn, w = dimension_numbers, operand.w
    idx = _dense(indices)
    row_lookup = (
        not tree.is_value(w) and w.ndim == 2
        and tuple(dn.collapsed_slice_dims) == (0,) and tuple(dn.start_index_map) == (0,)
        and not dn.operand_batching_dims
        and tuple(slice_sizes) == (1, w.shape[1])
    )
    if operand.mask is not None:
        raise ValueError(f"lora_mask (aLoRA) gates linear layers; {operand.name!r} is looked up as an embedding")
    if not row_lookup:
        return lax.gather_p.bind(operand.materialise(), idx, dimension_numbers=dn, slice_sizes=slice_sizes,
                                 **kwargs)
    base = lax.gather_p.bind(w, idx, dimension_numbers=dn, slice_sizes=slice_sizes, **kwargs)  # [..., D, ...]
    r = operand.a.shape[1]
    rows = lax.gather_p.bind(operand.a, idx, dimension_numbers=dn, slice_sizes=(1, r), **kwargs)  # [..., r, ...]
    (off,) = dn.offset_dims  # where D (and r for A's rows) sits in the result
    delta = jnp.moveaxis(jnp.moveaxis(rows, off, -1) @ operand.b.astype(rows.dtype), -1, off)
    out = base + (operand.scale * delta).astype(base.dtype)
    if operand.m is None:
        return out
    # DoRA (PEFT's DoraEmbeddingLayer): each row of m * (W0 + s*A*B) / ||W0 + s*A*B||, the norms
    # taken over the vocabulary for each of the D features, as for a linear layer's inputs.
    g = operand.dora_gain().astype(out.dtype)  # [D]
    return jnp.moveaxis(jnp.moveaxis(out, off, -1) * g, -1, off)


@quax.register(P.convert_element_type_p)
def _cast(x: StackedFactors, *, new_dtype, **kwargs):
    # bf16 compute casts the frozen weight; the factors follow so the LoRA path runs in it too
    # (other leaves, dropout keys or adapter indices, keep their types).
    return x.cast(lambda v: lax.convert_element_type(v, new_dtype))


@quax.register(P.transpose_p)
def _transpose(x: LoraArray, *, permutation):
    n = x.w.ndim
    perm = tuple(permutation)
    if perm[: n - 2] != tuple(range(n - 2)) or x.m is not None:  # DoRA's gain stays on `out`
        return lax.transpose(x.materialise(), perm)
    if perm[n - 2 :] == (n - 2, n - 1):
        return x
    if x.velora is not None:  # VeLoRA compresses the input of x @ A, which a transposed W would swap for B
        raise ValueError(f"VeLoRA compresses the input of x @ A for one matrix; {x.name!r} {tuple(x.w.shape)} is "
                         "used transposed here")
    sw = lambda v: jnp.swapaxes(v, -1, -2)
    # (W0 + s A B)^T = W0^T + s B^T A^T
    return eqx.tree_at(lambda t: (t.w, t.a, t.b), x, (lift(sw)(x.w), sw(x.b), sw(x.a)))


def _dot_reshaped(r: Reshaped, x: jax.Array, dn, kwargs, *, w_is_lhs: bool):
    """dot_general with a `Reshaped` kernel: x's axes that meet I (or O) merged into one, the
    matmul run on the [*S, in, out] inner value, the result's last axis split back."""
    (lc, rc), (lb, rb) = dn
    wc, xc, wb, xb = (lc, rc, lb, rb) if w_is_lhs else (rc, lc, rb, lb)
    s, ni, no = r.n_stack, len(r.in_shape), len(r.out_shape)
    groups = {tuple(range(s, s + ni)): (s, r.out_shape), tuple(range(s + ni, s + ni + no)): (s + 1, r.in_shape)}
    if tuple(sorted(wc)) not in groups or not set(wb) <= set(range(s)):
        w = r.materialise()
        return lax.dot_general_p.bind(*((w, x) if w_is_lhs else (x, w)), dimension_numbers=dn, **kwargs)
    inner_c, result = groups[tuple(sorted(wc))]
    order = [xc[list(wc).index(d)] for d in sorted(wc)]  # x's contracted dims, in W's axis order
    keep = [d for d in range(x.ndim) if d not in xc]
    xt = lax.transpose(x, (*keep, *order))
    x2 = xt.reshape(*xt.shape[: len(keep)], -1)  # [*x kept, prod(contracted)]
    dn2 = (((x2.ndim - 1,), (inner_c,)), (tuple(keep.index(d) for d in xb), tuple(wb)))
    out = lift(lax.dot_general)(x2, r.inner, dn2, **kwargs)  # [*batch, *x_free, *stack_free, prod(result)]
    out = out.reshape(*out.shape[:-1], *result)
    if w_is_lhs:  # dot_general(W, x) is [*batch, *w_free, *x_free]; we built [*batch, *x_free, *w_free]
        nb, nx = len(xb), x.ndim - len(xc) - len(xb)
        out = lax.transpose(out, (*range(nb), *range(nb + nx, out.ndim), *range(nb, nb + nx)))
    return out


@quax.register(P.dot_general_p, precedence=2)
def _dot_reshaped_lhs(lhs: Reshaped, rhs: ArrayLike | quax.ArrayValue, *, dimension_numbers, **kwargs):
    return _dot_reshaped(lhs, dense(rhs), dimension_numbers, kwargs, w_is_lhs=True)


@quax.register(P.dot_general_p, precedence=2)
def _dot_reshaped_rhs(lhs: ArrayLike | quax.ArrayValue, rhs: Reshaped, *, dimension_numbers, **kwargs):
    return _dot_reshaped(rhs, dense(lhs), dimension_numbers, kwargs, w_is_lhs=False)


@quax.register(P.dot_general_p, precedence=3)
def _dot_reshaped_both(lhs: Reshaped, rhs: Reshaped, *, dimension_numbers, **kwargs):
    return _dot_reshaped(lhs, rhs.materialise(), dimension_numbers, kwargs, w_is_lhs=True)


def _conv(x: jax.Array, kernel: Stacked, params: dict[str, Any]) -> jax.Array:
    """A convolution with a LoRA kernel [*spatial, in, out] (any order of the spatial and `in` axes)
    viewed as the matrix [prod(spatial, in), out] (`axes_pattern` (n_spatial + 1, 1)), PEFT's conv
    LoRA: conv(x, W0) + s * (conv(x, A) . B), A a convolution into r channels and B a 1x1 one.
    Grouped convolutions and other layouts materialise W0 + s*A*B."""
    dn = params["dimension_numbers"]
    lora = kernel.inner if isinstance(kernel, Reshaped) else kernel
    if isinstance(lora, LoraArray) and lora.mask is not None:
        raise ValueError(f"lora_mask (aLoRA) gates linear layers; {lora.name!r} is a convolution kernel")
    if isinstance(lora, LoraArray) and lora.velora is not None:
        raise ValueError(f"VeLoRA compresses the input of x @ A for linear layers; {lora.name!r} is a convolution "
                         "kernel")
    factored = (isinstance(kernel, Reshaped) and isinstance(lora, LoraArray) and kernel.n_stack == 0
                and len(kernel.out_shape) == 1 and dn.rhs_spec[0] == kernel.ndim - 1
                and params["feature_group_count"] == 1 and params["batch_group_count"] == 1)
    if not factored:
        if isinstance(lora, LoraArray) and not isinstance(kernel, Reshaped):
            _check_stack_contraction(lora, dn.rhs_spec[1:])
        return lax.conv_general_dilated_p.bind(x, kernel.materialise(), **params)
    shape = kernel.shape
    w0 = lift(lambda v: v.reshape(shape))(lora.w)  # the kernel [*in axes, out] itself
    conv = lambda lhs, rhs, **kw: lax.conv_general_dilated_p.bind(lhs, rhs, **(params | kw))  # noqa: E731
    base = lift(conv)(x, w0)
    xd = _dropout(x, lora)
    a = lora.a.reshape(*shape[:-1], lora.a.shape[-1]).astype(x.dtype)  # [*in axes, r]: a conv into r channels
    t = conv(xd, a, preferred_element_type=None)
    f = dn.out_spec[1]  # the output's feature dim
    u = jnp.moveaxis(jnp.moveaxis(t, f, -1) @ lora.b.astype(t.dtype), -1, f)  # B: a 1x1 conv, r -> out
    lora_out = (lora.scale * u).astype(base.dtype)
    if lora.m is None:
        return base + lora_out
    g = lora.dora_gain().astype(base.dtype).reshape([-1 if i == f else 1 for i in range(base.ndim)])
    if xd is x:
        return g * (base + lora_out)
    return base + (g - 1) * lift(conv)(xd, w0) + g * lora_out  # PEFT's DoRA under dropout, as for x @ W


@quax.register(P.conv_general_dilated_p)
def _conv_reshaped(lhs: ArrayLike | quax.ArrayValue, rhs: Reshaped, **params):
    return _conv(dense(lhs), rhs, params)


@quax.register(P.conv_general_dilated_p)
def _conv_lora(lhs: ArrayLike | quax.ArrayValue, rhs: LoraArray, **params):
    return _conv(dense(lhs), rhs, params)


@quax.register(P.convert_element_type_p)
def _cast_reshaped(x: Reshaped, *, new_dtype, **kwargs):
    return eqx.tree_at(lambda t: t.inner, x, lift(lambda v: lax.convert_element_type(v, new_dtype))(x.inner))


def _on_stack_dims(x: Stacked, dims) -> bool:
    return all(d < x.n_stack for d in dims)


@quax.register(P.squeeze_p)
def _squeeze(x: Stacked, *, dimensions):
    if not _on_stack_dims(x, dimensions):
        return lax.squeeze(x.materialise(), dimensions)
    return x.map(lambda v: lax.squeeze(v, dimensions))


@quax.register(P.slice_p)
def _slice(x: Stacked, *, start_indices, limit_indices, strides):
    k = x.n_stack  # slice stack dims only; the factors keep their own matrix dims
    full = all(s == 0 and l == d for s, l, d in zip(start_indices[k:], limit_indices[k:], x.shape[k:]))
    if not full or (strides is not None and any(s != 1 for s in strides[k:])):
        return lax.slice(x.materialise(), start_indices, limit_indices, strides)

    def sl(v):
        shape = v.shape
        st = tuple(start_indices[:k]) + (0,) * (v.ndim - k)
        lim = tuple(limit_indices[:k]) + tuple(shape[k:])
        return lax.slice(v, st, lim, None if strides is None else tuple(strides[:k]) + (1,) * (v.ndim - k))
    return x.map(sl)


@quax.register(P.dynamic_slice_p)
def _dynamic_slice(x: Stacked, *args: ArrayLike | quax.ArrayValue, slice_sizes):
    k = x.n_stack
    idx = [_dense(i) for i in args]
    if tuple(slice_sizes[k:]) != tuple(x.shape[k:]):
        return lax.dynamic_slice(x.materialise(), idx, slice_sizes)

    def sl(v):
        starts = list(idx[:k]) + [0] * (v.ndim - k)
        return lax.dynamic_slice(v, starts, tuple(slice_sizes[:k]) + tuple(v.shape[k:]))
    return x.map(sl)


@quax.register(P.pad_p)
def _pad(x: LoraArray, padding_value: ArrayLike | quax.ArrayValue, *, padding_config):
    """Edge padding of the matrix dims stays factored: W0 takes the padding value, and A's new
    rows (padded `in`) or B's new columns (padded `out`) are zeros, so the padded entries of
    W0 + s*A*B are the padding value (a padded vocabulary of a tied LM head)."""
    k, value = x.n_stack, _dense(padding_value)
    stack, (i_lo, i_hi, i_in), (o_lo, o_hi, o_in) = padding_config[:k], padding_config[k], padding_config[k + 1]
    plain = (all(c == (0, 0, 0) for c in stack) and i_in == o_in == 0 and min(i_lo, i_hi, o_lo, o_hi) >= 0
             and x.m is None  # DoRA's column norms would take in the padding
             and not ((i_lo or i_hi) and x.velora is not None))  # VeLoRA's projection is sized by `in`
    if not plain:
        return lax.pad(x.materialise(), value, padding_config)
    zero = ((0, 0, 0),) * k
    w = lift(lambda v: lax.pad(v, value.astype(v.dtype), padding_config))(x.w)
    a = lax.pad(x.a, jnp.zeros((), x.a.dtype), zero + ((i_lo, i_hi, 0), (0, 0, 0)))  # [*S, in', r]
    b = lax.pad(x.b, jnp.zeros((), x.b.dtype), zero + ((0, 0, 0), (o_lo, o_hi, 0)))  # [*S, r, out']
    return eqx.tree_at(lambda t: (t.w, t.a, t.b), x, (w, a, b))


@quax.register(P.remat_p)
def _remat(*args: ArrayLike | quax.ArrayValue, jaxpr, prevent_cse, differentiated, policy):
    # Re-trace the checkpointed body with quax inside, under the same remat policy.
    closed = jexc.ClosedJaxpr(jaxpr, ()) if not isinstance(jaxpr, jexc.ClosedJaxpr) else jaxpr
    fn = quax.quaxify(jexc.jaxpr_as_fun(closed))
    # every value of ours (LoRA, mixed-batch, Arrow, reshaped, quantized) enters as it is, so its rules
    # run inside and a quantized W0 is held as its codes; quax's wrapper of a plain operand is unwrapped
    args = tuple(a if isinstance(a, Stacked) else dense(a) for a in args)
    return jax.checkpoint(fn, prevent_cse=prevent_cse, policy=policy)(*args)


def _plain_vjp_call(self, primitive, fun, fwd, bwd, tracers, /, *, out_trees, symbolic_zeros):
    # quax has no rule for a `jax.custom_vjp` function (cuDNN attention, a user's kernel): it runs
    # under the parent trace on plain arrays, a value of ours materialised (or FallbackError).
    with jexc.set_current_trace(self.parent_trace):
        args = [dense(self.to_value(t)) for t in tracers]
        out = self.parent_trace.process_custom_vjp_call(primitive, fun, fwd, bwd, args, out_trees=out_trees,
                                                        symbolic_zeros=symbolic_zeros)
    return self.stage_value(list(out))


def _dense_jvp_call(process):
    @functools.wraps(process)
    def run(self, primitive, fun, jvp, tracers, /, **params):
        # quax hands a `jax.custom_jvp` rule the leaves of each value and their tangents, which
        # W0 + s*A*B is not linear in: a value of ours enters materialised (or FallbackError).
        if any(isinstance(self.to_value(t), Stacked) for t in tracers):
            with jexc.set_current_trace(self.parent_trace):
                tracers = [self.stage_value(x.materialise()) if isinstance(x, Stacked) else t
                           for t, x in ((t, self.to_value(t)) for t in tracers)]
        return process(self, primitive, fun, jvp, tracers, **params)
    return run


def _patch_quax_trace() -> None:
    try:
        from quax import _trace  # the trace class quaxify runs; no public name exists for it
        cls = _trace._QuaxTrace
    except (ImportError, AttributeError):  # another quax layout: its own rules, whatever they are
        warnings.warn("lora_jax: this quax has no quax._trace._QuaxTrace; a jax.custom_vjp function (cuDNN "
                      "attention) inside lj.apply may fail: install quax 0.4.6", stacklevel=2)
        return
    if "process_custom_vjp_call" not in vars(cls):  # a quax that handles custom_vjp keeps its own rule
        cls.process_custom_vjp_call = _plain_vjp_call
    if not getattr(cls.process_custom_jvp_call, "_lora_jax", False):
        cls.process_custom_jvp_call = _dense_jvp_call(cls.process_custom_jvp_call)
        cls.process_custom_jvp_call._lora_jax = True


_patch_quax_trace()
