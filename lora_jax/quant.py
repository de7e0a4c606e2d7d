"""Quantized frozen weights, stored as bitsandbytes stores them: 4-bit NormalFloat (QLoRA) or
8-bit rows (LLM.int8's weight layout, transformers' `load_in_8bit`).

    qparams = quant.quantize(params)                 # every linear kernel -> NF4 (embeddings stay)
    qparams = quant.quantize(params, scheme="int8")  # or int8, one scale per output feature
    g = lj.apply(model.apply, config)                # LoRA on top, as with dense params
    logits = jax.jit(g)(qparams, adapters, ids)
    base_logits = jax.jit(quant.apply(model.apply))(qparams, ids)   # no adapters

A quantized kernel [*S, in, out] is a `QuantizedArray`: the matrix in a torch Linear's (out, in)
order, flattened, cut in blocks of `block_size` values, each block scaled by its absmax and
rounded to the nearest of the 16 NF4 levels (QLoRA, Dettmers et al. 2023), two 4-bit codes per
byte (first in the high nibble). Codes and fp32 absmax equal bitsandbytes' `quantize_4bit(W,
blocksize, quant_type="nf4")` of the same weight, so 4.5 bits per weight instead of 16 or 32.
With `double_quant=True` (QLoRA's double quantization, bitsandbytes' `compress_statistics`)
the absmax are stored too: minus their mean, in blocks of 256, as 8-bit codes of bitsandbytes'
dynamic map with an fp32 scale per block, 4.127 bits per weight in all. `from_bnb` takes the
same bytes from a checkpoint transformers saved from a bitsandbytes 4-bit model.

`scheme="int8"` stores each output feature's weights (a row of the torch Linear) as int8 codes
round(w * 127 / absmax) with the row's fp32 absmax (bitsandbytes' `int8_vectorwise_quant` of
the fp16 weight, its SCB): 8 bits per weight plus 32 per row. `from_bnb` takes a `load_in_8bit`
checkpoint's `weight` and `SCB` as they are. The matmul uses the dequantized weight
(codes * absmax / 127); bitsandbytes' int8 kernel quantizes the activations as well (and keeps
outlier features in fp16), so its logits differ from these by that activation rounding.

Inside `quax.quaxify` (which `lj.apply` runs) a matmul with it dequantizes the weight to the
compute dtype right where the matmul runs, and the backward pass dequantizes again rather than
keeping a dense copy alive between the passes (bitsandbytes' 4-bit matmul saves the quantized
state the same way); slices of a layer stack stay quantized; a cast only changes the compute
dtype. Anything else uses the dense weight (`materialise`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import quax
from jax import lax
from jax.extend.core import primitives as P

from . import tree
from .config import ALL_LINEAR
from .lazy import Stacked, dense, lift

PyTree = Any
ArrayLike = jax.typing.ArrayLike

# The 16 NF4 levels: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero (bitsandbytes).
NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], np.float32)
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes accepts


class QuantizedArray(Stacked):
    """A quantized weight [*S, in, out]. `scheme` "nf4": codes [*S, ceil(in*out / block) * block
    / 2] uint8 and absmax [*S, nb = ceil(in*out / block)], fp32, or with double quantization
    uint8 codes of DYNAMIC with absmax2 [*S, ceil(nb / 256)] fp32 and offset [*S] fp32. "int8":
    codes [*S, out * in] int8 (torch's (out, in), row-major) and absmax [*S, out] fp32
    (bitsandbytes' SCB), block_size = in. `dtype_` is the dtype it dequantizes to."""

    codes: jax.Array
    absmax: jax.Array
    absmax2: jax.Array | None
    offset: jax.Array | None
    matrix: tuple[int, int] = eqx.field(static=True)  # (in, out)
    dtype_: Any = eqx.field(static=True)
    block_size: int = eqx.field(static=True)
    scheme: str = eqx.field(static=True, default="nf4")

    def aval(self):
        return jax.core.ShapedArray((*self.codes.shape[:-1], *self.matrix), self.dtype_)

    def scales(self) -> jax.Array:
        """The fp32 absmax [*S, nb] (dequantized first under double quantization)."""
        if self.absmax2 is None:
            return self.absmax
        return dequantize_absmax(self.absmax, self.absmax2, self.offset)

    def materialise(self) -> jax.Array:
        if self.scheme == "int8":
            return dequantize_int8(self.codes, self.absmax, self.matrix, self.dtype_)
        return dequantize_nf4(self.codes, self.scales(), self.matrix, self.block_size, self.dtype_)

    def map(self, fn) -> "QuantizedArray":
        opt = lambda v: None if v is None else fn(v)  # noqa: E731
        return eqx.tree_at(lambda t: (t.codes, t.absmax, t.absmax2, t.offset), self,
                           (fn(self.codes), fn(self.absmax), opt(self.absmax2), opt(self.offset)),
                           is_leaf=lambda x: x is None)

    def astype(self, dtype: Any) -> "QuantizedArray":
        """The same codes, dequantizing to `dtype`."""
        return dataclasses.replace(self, dtype_=jnp.dtype(dtype))


def dynamic_map() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map()`): 256 sorted fp32 values
    in [-1, 1], a sign, a decimal exponent 10^-6..10^0 and a linear fraction in (0.1, 1)."""
    def linspace(n):  # torch.linspace's float32 arithmetic, from both ends
        start, end = np.float32(0.1), np.float32(1.0)
        step = (end - start) / np.float32(n - 1)
        i = np.arange(n)
        return np.where(i < n // 2, start + step * i, end - step * (n - 1 - i)).astype(np.float32)
    parts = [np.float32([0.0, 1.0])]
    for e in range(7):
        b = linspace(2**e + 1)
        means = (b[:-1] + b[1:]) / np.float32(2)
        scale = np.float32(10.0 ** (e - 6))
        parts += [scale * means, -scale * means]
    return np.sort(np.concatenate(parts).astype(np.float32))


DYNAMIC = dynamic_map()
ABSMAX_BLOCK = 256  # absmax per second-level block, as bitsandbytes' nested quantization


def quantize_absmax(absmax: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Double quantization of absmax [*S, nb]: (codes uint8 [*S, nb], absmax2 [*S, nb2], offset
    [*S]); the codes pick the nearest DYNAMIC value of (absmax - offset) / absmax2 per block."""
    *stack, nb = absmax.shape
    offset = jnp.mean(absmax, axis=-1)  # [*S]
    centred = absmax - offset[..., None]
    nb2 = -(-nb // ABSMAX_BLOCK)
    blocks = jnp.pad(centred, [(0, 0)] * len(stack) + [(0, nb2 * ABSMAX_BLOCK - nb)])
    blocks = blocks.reshape(*stack, nb2, ABSMAX_BLOCK)  # [*S, nb2, 256]
    absmax2 = jnp.max(jnp.abs(blocks), axis=-1)  # [*S, nb2]
    normed = (blocks / jnp.where(absmax2 == 0, 1.0, absmax2)[..., None]).reshape(*stack, -1)[..., :nb]
    mids = jnp.asarray((DYNAMIC[1:] + DYNAMIC[:-1]) / 2)
    return jnp.searchsorted(mids, normed, side="left").astype(jnp.uint8), absmax2, offset


def dequantize_absmax(codes: jax.Array, absmax2: jax.Array, offset: jax.Array) -> jax.Array:
    """The fp32 absmax [*S, nb] back from `quantize_absmax`'s output."""
    nb = codes.shape[-1]
    scale = jnp.repeat(absmax2, ABSMAX_BLOCK, axis=-1)[..., :nb]  # [*S, nb]
    return jnp.asarray(DYNAMIC)[codes] * scale + offset[..., None]


def quantize_nf4(w: jax.Array, block_size: int = 64) -> tuple[jax.Array, jax.Array]:
    """(codes, absmax) of w [*S, in, out]; see the module docstring for the layout."""
    *stack, d_in, d_out = w.shape
    n = d_in * d_out
    n_blocks = -(-n // block_size)
    flat = jnp.swapaxes(w, -1, -2).astype(jnp.float32).reshape(*stack, n)  # torch (out, in), row-major
    flat = jnp.pad(flat, [(0, 0)] * len(stack) + [(0, n_blocks * block_size - n)])
    blocks = flat.reshape(*stack, n_blocks, block_size)  # [*S, nb, block]
    absmax = jnp.max(jnp.abs(blocks), axis=-1)  # [*S, nb]
    normed = blocks / jnp.where(absmax == 0, 1.0, absmax)[..., None]
    mids = jnp.asarray((NF4[1:] + NF4[:-1]) / 2)  # nearest level: count the midpoints below
    idx = jnp.searchsorted(mids, normed.reshape(-1), side="left").astype(jnp.uint8)
    idx = idx.reshape(*stack, n_blocks * block_size // 2, 2)  # [*S, bytes, 2]
    return (idx[..., 0] << 4) | idx[..., 1], absmax


def dequantize_nf4(codes: jax.Array, absmax: jax.Array, matrix: tuple[int, int], block_size: int,
                   dtype: Any) -> jax.Array:
    """The weight [*S, in, out] in `dtype` from NF4 codes and block absmax."""
    d_in, d_out = matrix
    *stack, n_bytes = codes.shape
    idx = jnp.stack([codes >> 4, codes & 15], axis=-1).reshape(*stack, n_bytes * 2)  # [*S, nb * block]
    levels = jnp.asarray(NF4)[idx].reshape(*stack, -1, block_size)  # [*S, nb, block]
    vals = (levels * lax.stop_gradient(absmax)[..., None]).reshape(*stack, -1)[..., : d_in * d_out]
    return jnp.swapaxes(vals.reshape(*stack, d_out, d_in), -1, -2).astype(dtype)  # [*S, in, out]


INT8_STEP = np.float32(7.874015718698502e-3)  # 1 / 127 as bitsandbytes multiplies by it


def quantize_int8(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(codes int8 [*S, out * in], absmax fp32 [*S, out]) of w [*S, in, out]: bitsandbytes'
    `int8_vectorwise_quant` of the torch weight (out, in) in fp16, rounding half to even."""
    *stack, d_in, d_out = w.shape
    rows = jnp.swapaxes(w, -1, -2).astype(jnp.float16).astype(jnp.float32)  # [*S, out, in]
    absmax = jnp.max(jnp.abs(rows), axis=-1)  # [*S, out]
    # 1 / absmax, then * 127: torch computes `127.0 / t` as reciprocal(t) * 127, which rounds differently
    scale = jnp.reciprocal(jnp.where(absmax == 0, 1.0, absmax)) * jnp.float32(127.0)  # an all-zero row: codes 0
    codes = jnp.round(rows * scale[..., None]).astype(jnp.int8)
    return codes.reshape(*stack, d_out * d_in), absmax


def dequantize_int8(codes: jax.Array, absmax: jax.Array, matrix: tuple[int, int], dtype: Any) -> jax.Array:
    """The weight [*S, in, out] in `dtype` from int8 row codes and row absmax (codes * absmax / 127)."""
    d_in, d_out = matrix
    rows = codes.reshape(*codes.shape[:-1], d_out, d_in).astype(jnp.float32)  # [*S, out, in]
    vals = rows * lax.stop_gradient(absmax)[..., None] * INT8_STEP
    return jnp.swapaxes(vals, -1, -2).astype(dtype)  # [*S, in, out]


def _is_float(x: Any) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) and not tree.is_value(x)


SCHEMES = ("nf4", "int8")


def quantize(params: PyTree, targets: str | Sequence[str] = ALL_LINEAR, *, exclude: str | Sequence[str] | None = None,
             block_size: int | None = None, double_quant: bool = False, dtype: Any = None,
             scheme: str = "nf4") -> PyTree:
    """params with the selected weight matrices as `QuantizedArray`s (the rest untouched).

    Args:
      params: a parameter tree.
      targets: "all-linear" (every linear kernel / weight, stacks included, but an `lm_head` or a
        task head such as a classifier's `score`: what bitsandbytes quantizes in a transformers model) or a pattern as in LoraConfig, of
        which the linear weights (`kernel`, `weight`, `w`) are taken; biases, norms and embedding
        tables stay as they are.
      exclude: leaves never quantized (same pattern forms).
      block_size: NF4 values per absmax (bitsandbytes' `blocksize`; default 64, QLoRA's).
      double_quant: store the NF4 absmax in 8 bits too (bitsandbytes' `bnb_4bit_use_double_quant`).
      dtype: the compute dtype they dequantize to (default: each weight's own dtype).
      scheme: "nf4" (4 bits, `load_in_4bit`) or "int8" (8 bits per weight, one absmax per
        output feature, `load_in_8bit`; no block_size or double_quant).
    Returns:
      The new tree. Use it through `lj.apply(f, config)` or `quant.apply(f)`.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"quantize: scheme {scheme!r} is not one of {SCHEMES}")
    if scheme == "int8" and (block_size is not None or double_quant):
        raise ValueError("quantize: scheme 'int8' keeps one absmax per output feature (bitsandbytes' LLM.int8 "
                         "layout); block_size and double_quant are NF4's")
    block_size = 64 if block_size is None else block_size
    if scheme == "nf4" and block_size not in BLOCK_SIZES:
        raise ValueError(f"quantize: block_size {block_size!r} is not one of {BLOCK_SIZES}")
    flat = tree.flatten(params)
    chosen = tree.linear_paths(flat) if targets == ALL_LINEAR else tree.select(targets, list(flat))
    excluded = set(tree.select(exclude, list(flat)))
    chosen = [p for p in chosen if p not in excluded and tree.leaf_name(p) in tree.LINEAR_NAMES]
    if not chosen:
        raise ValueError(f"quantize: targets {targets!r} (exclude={exclude!r}) select no weight; "
                         f"closest paths: {tree.closest(targets, list(flat))}")
    for p in chosen:
        x = flat[p]
        if isinstance(x, QuantizedArray):
            raise ValueError(f"quantize: {p!r} is already quantized")
        if not _is_float(x) or x.ndim < 2:
            raise ValueError(f"quantize: {p!r} ({getattr(x, 'dtype', type(x).__name__)}, shape "
                             f"{tuple(getattr(x, 'shape', ()))}) is not a float matrix or a stack of matrices")
    chosen_set = set(chosen)
    return tree.map_with_path(lambda path, x: _quantize_array(x, scheme, block_size, double_quant, dtype)
                              if path in chosen_set else x, params)


_quant_nf4, _quant_int8, _quant_absmax = (jax.jit(quantize_nf4, static_argnums=1), jax.jit(quantize_int8),
                                          jax.jit(quantize_absmax))


def _quantize_array(x: jax.Array, scheme: str, block_size: int, double_quant: bool, dtype: Any) -> QuantizedArray:
    """One float matrix (or stack) [*S, in, out] as a `QuantizedArray` dequantizing to `dtype`
    (default x's own)."""
    dtype = jnp.dtype(dtype or x.dtype)
    if scheme == "int8":
        codes, absmax = _quant_int8(x)
        return QuantizedArray(codes, absmax, None, None, tuple(x.shape[-2:]), dtype, x.shape[-2], "int8")
    codes, absmax = _quant_nf4(x, block_size)
    absmax2 = offset = None
    if double_quant:
        absmax, absmax2, offset = _quant_absmax(absmax)
    return QuantizedArray(codes, absmax, absmax2, offset, tuple(x.shape[-2:]), dtype, block_size)


def requantize(x: jax.Array, like: QuantizedArray) -> QuantizedArray:
    """x [*S, in, out] quantized as `like` is: its scheme, block size, double quantization and
    compute dtype. What bitsandbytes does to a merged weight in PEFT's `merge_and_unload` of a 4-
    or 8-bit model (`lj.merge(..., requantize=True)`)."""
    if tuple(x.shape) != tuple(like.shape):
        raise ValueError(f"requantize: shape {tuple(x.shape)} is not the quantized weight's {tuple(like.shape)}")
    return _quantize_array(x, like.scheme, like.block_size, like.absmax2 is not None, like.dtype_)


BNB_STATE = ".quant_state.bitsandbytes__"  # + quant type: the JSON blob transformers saves per 4-bit weight
BNB_SCB = ".SCB"  # an 8-bit weight's row absmax: `<module>.SCB` beside `<module>.weight`


def is_bnb(state: Mapping[str, Any]) -> bool:
    """Whether a state dict holds weights transformers saved from a bitsandbytes 4- or 8-bit model."""
    return any(BNB_STATE in k or k.endswith(BNB_SCB) for k in state)


def from_bnb(state: Mapping[str, Any], dtype: Any = None) -> dict[str, Any]:
    """A state dict as transformers saves a bitsandbytes 4- or 8-bit model (`load_in_4bit` /
    `load_in_8bit`, then `save_pretrained`), with each quantized `<module>.weight` as one
    `QuantizedArray` [in, out].

    bitsandbytes stores `<w>` (packed codes), `<w>.absmax`, `<w>.quant_map`,
    `<w>.quant_state.bitsandbytes__nf4` (JSON: shape (out, in), blocksize, dtype, nested offset)
    and, under double quantization, `<w>.nested_absmax` / `<w>.nested_quant_map`: our layout, so
    the bytes are taken as they are. An 8-bit weight is `<module>.weight` (int8 (out, in)) with
    `<module>.SCB` (its rows' absmax) and `<module>.weight_format` (0: row-major, the only one).
    Other tensors pass through. `dtype`: the compute dtype (default: the dtype the 4-bit weights
    were quantized from; float32 for 8-bit ones, whose checkpoints do not say).
    """
    out = dict(state)
    for key in [k for k in state if k.endswith(BNB_SCB)]:
        module = key[: -len(BNB_SCB)]
        name, scb = module + ".weight", np.asarray(out.pop(key), np.float32)
        fmt = out.pop(module + ".weight_format", None)
        if fmt is not None and int(np.asarray(fmt)) != 0:
            raise ValueError(f"{module}.weight_format is {int(np.asarray(fmt))}: only bitsandbytes' row-major int8 "
                             "weights (format 0) load")
        w = out.get(name)
        if w is None or np.asarray(w).dtype != np.int8 or np.asarray(w).ndim != 2 or scb.shape != (w.shape[0],):
            raise ValueError(f"{key} {scb.shape}: an 8-bit weight's row absmax without its int8 (out, in) weight "
                             f"{name}" + ("" if w is None else f" (got {np.asarray(w).dtype} {tuple(w.shape)})"))
        d_out, d_in = w.shape
        out[name] = QuantizedArray(jnp.asarray(np.asarray(w).reshape(-1)), jnp.asarray(scb), None, None, (d_in, d_out),
                                   jnp.dtype(dtype or jnp.float32), d_in, "int8")
    for key in [k for k in state if BNB_STATE in k]:
        name, kind = key.split(BNB_STATE)
        meta = json.loads(bytes(np.asarray(out.pop(key), np.uint8)).decode())
        parts = {s: out.pop(name + s, None) for s in (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")}
        if kind != "nf4" or meta.get("quant_type") != "nf4" or not np.array_equal(parts[".quant_map"], NF4):
            raise ValueError(f"{name}: bitsandbytes quant type {kind!r} with its code map; only nf4 is supported")
        nested = parts[".nested_absmax"] is not None
        if nested and not np.array_equal(parts[".nested_quant_map"], DYNAMIC):
            raise ValueError(f"{name}: the nested absmax use a code map other than bitsandbytes' dynamic map")
        if name not in out or parts[".absmax"] is None:
            raise ValueError(f"{name}: a 4-bit quant state without its codes or absmax")
        d_out, d_in = meta["shape"]
        block = int(meta["blocksize"])
        n_bytes = -(-d_in * d_out // block) * block // 2  # codes padded to whole blocks, as quantize_nf4 makes them
        codes = np.ascontiguousarray(out.pop(name)).reshape(-1).view(np.uint8)  # the bytes, whatever quant_storage
        if codes.size != (d_in * d_out + 1) // 2 or parts[".absmax"].size != -(-d_in * d_out // block):
            raise ValueError(f"{name}: {codes.size} code bytes and {parts['.absmax'].size} absmax do not fit shape "
                             f"{meta['shape']} in blocks of {block}")
        absmax, absmax2, offset = jnp.asarray(parts[".absmax"]), None, None
        if nested:
            absmax2 = jnp.asarray(parts[".nested_absmax"], jnp.float32)
            offset = jnp.asarray(meta["nested_offset"], jnp.float32)
        # pad as quantize_nf4 pads (zeros, NF4 level 7 in both nibbles), so the same weight has the same codes
        codes = jnp.asarray(np.pad(codes, (0, n_bytes - codes.size), constant_values=0x77))
        out[name] = QuantizedArray(codes, absmax, absmax2, offset, (d_in, d_out), jnp.dtype(dtype or meta["dtype"]),
                                   block)
    return out


def dequantize(params: PyTree) -> PyTree:
    """params with every QuantizedArray replaced by its dense weight (its compute dtype)."""
    return tree.map_with_path(lambda _, x: dense(x) if isinstance(x, QuantizedArray) else x, params)


def apply(f):
    """`f(params, *args)` that runs on params holding QuantizedArrays (a no-op wrap otherwise)."""
    return lift(f)


def nbytes(params: PyTree) -> int:
    """Bytes the tree holds in memory (codes and scales for quantized leaves)."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(params) if hasattr(x, "dtype"))


# ------------------------------------------------------------------------------------- rules


def _qdot(lhs, rhs, dimension_numbers, kwargs):
    """dot_general with a quantized operand, dequantized where the matmul runs, in both passes.

    Each dequantization reads the other operand (the activation forward, the cotangent
    backward), so XLA cannot hoist every layer's dense weight to the start of a pass (measured:
    it does, for unrolled layers, even through `lax.optimization_barrier`, which the CPU
    compiler drops); the custom VJP saves the codes, not a dense weight, for the backward pass.
    """
    # The other operand may come as quax's wrapper of a plain array: unwrap it once, here.
    lhs, rhs = (x if isinstance(x, QuantizedArray) else dense(x) for x in (lhs, rhs))

    def dot(lhs, rhs):
        return lax.dot_general_p.bind(dense(lhs), dense(rhs), dimension_numbers=dimension_numbers, **kwargs)

    def tie(q, t):
        # Make the dequantization read t (flip no bit unless t holds a NaN, when the result is
        # NaN anyway), so XLA cannot schedule it before t exists and hold every layer's dense weight.
        if not isinstance(q, QuantizedArray) or isinstance(t, QuantizedArray):
            return q
        first = jnp.ravel(t)[:1]  # [1], or [0] for an operand with no elements (an empty batch)
        return eqx.tree_at(lambda u: u.codes, q, q.codes ^ jnp.any(first != first).astype(q.codes.dtype))

    @jax.custom_vjp
    def qdot(lhs, rhs):
        return dot(tie(lhs, rhs), tie(rhs, lhs))

    def fwd(lhs, rhs):
        return qdot(lhs, rhs), (lhs, rhs)

    def bwd(res, g):
        lhs, rhs = res
        return jax.vjp(dot, tie(lhs, g), tie(rhs, g))[1](g)  # float0 for the codes, zeros for the absmax

    qdot.defvjp(fwd, bwd)
    return qdot(lhs, rhs)


# Below the LoRA rules (precedence 0): a LoraArray meeting a QuantizedArray operand keeps its rule.
@quax.register(P.dot_general_p, precedence=-1)
def _dot_q_lhs(lhs: QuantizedArray, rhs: ArrayLike | quax.ArrayValue, *, dimension_numbers, **kwargs):
    return _qdot(lhs, rhs, dimension_numbers, kwargs)


@quax.register(P.dot_general_p, precedence=-1)
def _dot_q_rhs(lhs: ArrayLike | quax.ArrayValue, rhs: QuantizedArray, *, dimension_numbers, **kwargs):
    return _qdot(lhs, rhs, dimension_numbers, kwargs)


@quax.register(P.dot_general_p, precedence=-1)
def _dot_q_both(lhs: QuantizedArray, rhs: QuantizedArray, *, dimension_numbers, **kwargs):
    return _qdot(lhs, rhs, dimension_numbers, kwargs)


@quax.register(P.convert_element_type_p)
def _cast_q(x: QuantizedArray, *, new_dtype, **kwargs):
    if not jnp.issubdtype(new_dtype, jnp.floating):
        return lax.convert_element_type(x.materialise(), new_dtype)
    return x.astype(new_dtype)
