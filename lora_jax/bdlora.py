"""BD-LoRA (PEFT's `use_bdlora`): LoRA with a block-diagonal lora_A or lora_B per module.

    config = LoraConfig(rank=16, targets="all-linear", use_bdlora=BdLoraConfig(
        target_modules_bd_a=["c_proj"], target_modules_bd_b=["c_attn", "c_fc"], nblocks=4))

A tensor-parallel server that shards a layer's weight over n devices can shard its adapter the
same way only when the factor facing the sharded dimension is block-diagonal with n blocks; then
the LoRA path needs no collective of its own. Training is the same as LoRA's: the factors keep
their full shapes ([*S, in, r], [*S, r, out]) with zeros off the blocks; `apply` and `merge` multiply
them by the block mask, so those zeros get no gradient and never change, whatever the optimizer.
PEFT files hold the blocks alone (`peft.save_peft` / `load_peft` convert).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .config import LoraConfig

Adapters = dict[str, dict[str, jax.Array]]


def module_name(path: str) -> str:
    """The dotted module name BD-LoRA's patterns are matched in, as PEFT matches them
    (`transformer/h/0/attn/c_attn/kernel` -> `transformer.h.0.attn.c_attn`)."""
    return path.rsplit("/", 1)[0].replace("/", ".")


def side(config: LoraConfig, path: str) -> str | None:
    """"a" / "b": the block-diagonal factor of the adapter at `path`; None without BD-LoRA there."""
    return None if config.use_bdlora is None else config.use_bdlora.side(module_name(path))


def block_mask(n: int, rows: int, cols: int) -> np.ndarray:
    """[rows, cols] float32: 1 on the n diagonal blocks of (rows/n) x (cols/n), 0 elsewhere."""
    return np.kron(np.eye(n, dtype=np.float32), np.ones((rows // n, cols // n), np.float32))


def check_shape(config: LoraConfig, path: str, d_in: int, r: int, d_out: int) -> None:
    """Raise, naming the path and the sizes, unless nblocks divides the block-diagonal factor's sides."""
    s = side(config, path)
    if s is None:
        return
    n, sizes = config.use_bdlora.nblocks, {"a": {"in": d_in, "r": r}, "b": {"r": r, "out": d_out}}[s]
    bad = {k: v for k, v in sizes.items() if v % n}
    if bad:
        raise ValueError(f"BD-LoRA: lora_{s.upper()} of {path!r} ({sizes}) cannot hold {n} diagonal blocks: "
                         f"nblocks does not divide {bad}")


def masks(config: LoraConfig, path: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...]
          ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(mask of lora_A [in, r] or None, mask of lora_B [r, out] or None) at `path`."""
    s = side(config, path)
    if s is None:
        return None, None
    n = config.use_bdlora.nblocks
    return (block_mask(n, *a_shape[-2:]), None) if s == "a" else (None, block_mask(n, *b_shape[-2:]))


def masked(config: LoraConfig, path: str, a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(a, b) with the entries off the block diagonal zeroed (the mask also stops their gradient)."""
    ma, mb = masks(config, path, a.shape, b.shape)
    a = a if ma is None else a * jnp.asarray(ma, a.dtype)
    return a, (b if mb is None else b * jnp.asarray(mb, b.dtype))


def mask_adapters(config: LoraConfig, adapters: Mapping[str, Any]) -> Adapters:
    """`adapters` with every block-diagonal factor masked (the identity without BD-LoRA)."""
    if config.use_bdlora is None:
        return dict(adapters)
    out = {}
    for p, ab in adapters.items():
        if "lora_A" in ab:
            a, b = masked(config, p, ab["lora_A"], ab["lora_B"])
            ab = {**ab, "lora_A": a, "lora_B": b}
        out[p] = ab
    return out


def blocks(x: np.ndarray, n: int) -> np.ndarray:
    """PEFT's stored form of a block-diagonal factor in torch layout (rows, cols): the n diagonal
    blocks stacked along the rows, (rows, cols/n)."""
    rows, cols = x.shape
    return np.concatenate([x[i * rows // n:(i + 1) * rows // n, i * cols // n:(i + 1) * cols // n] for i in range(n)])


def unblocks(x: np.ndarray, n: int) -> np.ndarray:
    """Inverse of `blocks`: (rows, cols/n) -> the (rows, cols) block-diagonal matrix (torch.block_diag)."""
    rows, width = x.shape
    out = np.zeros((rows, width * n), x.dtype)
    for i in range(n):
        out[i * rows // n:(i + 1) * rows // n, i * width:(i + 1) * width] = x[i * rows // n:(i + 1) * rows // n]
    return out


def off_block_count(config: LoraConfig, path: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> int:
    """How many entries of the adapter's block-diagonal factor are masked zeros (PEFT holds only the blocks)."""
    ma, mb = masks(config, path, a_shape, b_shape)
    m, shape = (ma, a_shape) if ma is not None else (mb, b_shape) if mb is not None else (None, None)
    return 0 if m is None else int(np.prod(shape[:-2], dtype=np.int64)) * int(m.size - m.sum())


def to_lora(config: LoraConfig, adapters: Mapping[str, Any]) -> tuple[LoraConfig, Adapters]:
    """Plain LoRA with the same deltas (the dense masked factors): for `multi`, `combine`,
    hotswapping or Arrow, which route or pad plain factor pairs."""
    return dataclasses.replace(config, use_bdlora=None), mask_adapters(config, adapters)
