"""LoftQ (Li et al. 2023; PEFT's `init_lora_weights="loftq"`): a 4-bit base and LoRA factors
chosen together, so that the quantized model starts closer to the full-precision one than QLoRA's.

    qparams, adapters = init_loftq(config, params, iters=5)   # every linear weight NF4, as quantize()
    ... QLoRA on (qparams, adapters): lj.split / lj.apply as usual ...

For each targeted weight W, alternate T times: Q = NF4(W - s*A*B), then s*A*B = the rank-r SVD of
W - deq(Q) (starting from A*B = 0, so one iteration is QLoRA's Q plus the SVD of its error).
The adapters are plain LoRA on the returned base: export them as they are, together with that
base (`quant.dequantize(qparams)` saved as a checkpoint re-quantizes to the same NF4 codes,
without double quantization), which is PEFT's LoftQ workflow. PEFT stores the SVD factors
unscaled, exact only at alpha = r; here s*A*B is the truncated SVD whatever alpha is.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp

from . import quant, tree
from .config import LoraConfig
from .lazy import column_norms
from .lora import LORA_BIAS, MAGNITUDE, Adapters, init_tokens, layer_gate, target_paths
from .residual import svd_factors

PyTree = Any


def _quantize(w: jax.Array, block_size: int, double_quant: bool, dtype: Any) -> quant.QuantizedArray:
    return quant.quantize({"kernel": w}, block_size=block_size, double_quant=double_quant, dtype=dtype)["kernel"]


def init_loftq(config: LoraConfig, params: PyTree, *, iters: int = 1, block_size: int = 64,
               double_quant: bool = False, dtype: Any = jnp.float32) -> tuple[PyTree, Adapters]:
    """(params with every linear weight in NF4, adapters) by LoftQ on the weights `config` targets.

    Args:
      config: a plain LoRA config (rank, alpha, targets, DoRA); its targets must be linear weights.
      params: full-precision params.
      iters: alternations of quantization and SVD (PEFT `loftq_iter`; LoftQ's paper uses 1 to 5).
      block_size, double_quant: the NF4 layout, as `quant.quantize` (QLoRA: 64, either).
      dtype: factor dtype.
    Returns:
      (params as `quant.quantize(params, ...)` gives them, the targeted weights holding LoftQ's
      codes; adapters {path: {"lora_A", "lora_B"}} with deq(Q) + s*A*B close to W (+ DoRA's
      magnitude, the column norms of that sum, so DoRA starts from it too)).
    """
    if config.changes_base:
        raise ValueError(f"init_loftq makes its own factors; init={config.init!r} moves W0 into the adapter "
                         "(init_residual): use a plain config")
    if config.use_kasa:
        raise ValueError("init_loftq fits NF4 codes of W0 itself; KaSA (use_kasa) truncates W0: use one or the other")
    if config.adalora is not None:
        raise ValueError("init_loftq makes plain LoRA factors; AdaLoRA (adalora) has its own init (PEFT refuses "
                         "LoftQ with AdaLoRA too)")
    if config.use_bdlora is not None:
        raise ValueError("init_loftq makes its factors from an SVD, which are not BD-LoRA's (use_bdlora) "
                         "block-diagonal ones")
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"init_loftq: iters must be a positive integer, got {iters!r}")
    flat = tree.flatten(params)
    targets = target_paths(config, params)
    for p in targets:
        w0 = flat[p]
        if tree.is_value(w0) or tree.leaf_name(p) not in tree.LINEAR_NAMES:
            kind = type(w0).__name__ if tree.is_value(w0) else f"a '{tree.leaf_name(p)}' leaf"
            raise ValueError(f"init_loftq: {p!r} is {kind}; LoftQ quantizes full-precision linear weights "
                             "(exclude it, or start from unquantized params)")
        if config.axes_for(p) != (1, 1):
            raise ValueError(f"init_loftq: {p!r} {tuple(w0.shape)} is adapted as a matrix of several axes "
                             f"(axes_pattern {config.axes_for(p)}); LoftQ's NF4 codes are laid out for "
                             "[*S, in, out] kernels")
    rest = sorted(set(tree.linear_paths(flat)) - set(targets))  # plain NF4, as quantize() does
    base = quant.quantize(params, "|".join(re.escape(p) for p in rest), block_size=block_size,
                          double_quant=double_quant) if rest else params
    adapters: Adapters = {}
    loftq: dict[str, quant.QuantizedArray] = {}
    for p in targets:
        w0 = flat[p]
        r, scale = config.rank_for(p), config.scale_for(p)
        *stack, d_in, d_out = w0.shape
        w = jnp.asarray(w0, jnp.float32)
        res = w
        gate = layer_gate(config, p, w0.shape)  # layers left out: NF4(W0) and zero factors
        g = 1.0 if gate is None else jnp.asarray(gate.reshape(-1, 1, 1), jnp.float32)
        with jax.default_matmul_precision("highest"):
            for i in range(iters):
                q = _quantize(res, block_size, double_quant, w0.dtype)
                deq = q.materialise().astype(jnp.float32)
                flat_res = (w - deq).reshape(-1, d_in, d_out)  # [prod(S), in, out]
                a, b = jax.vmap(lambda m: svd_factors(m, r, scale))(flat_res)  # [n, in, r], [n, r, out]
                a, b = a * g, b * g
                delta = (scale * (a @ b)).reshape(w.shape)
                if i + 1 < iters:
                    res = w - delta
        loftq[p] = q
        adapters[p] = {"lora_A": a.reshape(*stack, d_in, r).astype(dtype),
                       "lora_B": b.reshape(*stack, r, d_out).astype(dtype)}
        if config.lora_bias:
            adapters[p][LORA_BIAS] = jnp.zeros((*stack, d_out), dtype)
        if config.use_dora:
            adapters[p][MAGNITUDE] = column_norms(deq + delta).reshape(*stack, d_out).astype(dtype)
    adapters |= init_tokens(config, params, dtype=dtype)
    return tree.map_with_path(lambda p, x: loftq.get(p, x), base), adapters
