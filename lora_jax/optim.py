"""Optax wiring: what trains, and optimizers that keep state only for it.

The train-step pattern (`make_train_step` below is it, spelled out once):

    trainable = {"adapters": adapters, "params": partition(params, mask)[0]}
    frozen    = partition(params, mask)[1]
    grads     = jax.grad(loss)(trainable, frozen, batch)   # no gradient of a frozen leaf
    updates, opt_state = tx.update(grads, opt_state, trainable)

`tx` sees only the trainable tree, so its state holds nothing for frozen weights. When a
codebase keeps one tree with everything in it, `masked_optimizer` gives the same guarantee
with `optax.multi_transform` + `set_to_zero` (note: `optax.masked` alone would pass the raw
gradient of masked leaves through, it does not freeze them).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from . import tree
from .config import MICA, PLAIN_INITS, LoraConfig
from .lora import ADALORA_E, Adapters, trainable_mask

PyTree = Any


def split(config: LoraConfig, params: PyTree, adapters: Adapters) -> tuple[PyTree, PyTree]:
    """(trainable, frozen): trainable = {"adapters", "params": extras with None holes}."""
    extras, frozen = tree.partition(params, trainable_mask(config, params))
    return {"adapters": adapters, "params": extras}, frozen


def join(trainable: PyTree, frozen: PyTree) -> tuple[PyTree, Adapters]:
    """Inverse of `split`: (params, adapters)."""
    return tree.combine(trainable["params"], frozen), trainable["adapters"]


def labels(config: LoraConfig, params: PyTree, adapters: Adapters) -> PyTree:
    """'trainable' / 'frozen' labels for the whole tree {"params": ..., "adapters": ...}."""
    m = trainable_mask(config, params)
    return {"params": jax.tree.map(lambda t: "trainable" if t else "frozen", m),
            "adapters": jax.tree.map(lambda _: "trainable", adapters)}


def masked_optimizer(tx: optax.GradientTransformation, label_tree: PyTree) -> optax.GradientTransformation:
    """Wrap any optax optimizer so 'frozen' leaves get zero updates and no optimizer state."""
    return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, label_tree)


class TrainStep(NamedTuple):
    """`init(trainable) -> opt_state`; `step(trainable, frozen, opt_state, *batch) -> (trainable, opt_state, loss)`."""

    init: Callable[..., Any]
    step: Callable[..., Any]


def make_train_step(loss_fn: Callable[..., jax.Array], tx: optax.GradientTransformation) -> TrainStep:
    """A pure train step that differentiates only the trainable tree.

    Args:
      loss_fn: `loss_fn(params, adapters, *batch) -> scalar` (call your LoRA-applied model in it).
      tx: any optax optimizer; its state covers the trainable tree only.
    """
    def objective(trainable, frozen, *batch):
        params, adapters = join(trainable, frozen)
        return loss_fn(params, adapters, *batch)

    def step(trainable, frozen, opt_state, *batch):
        loss, grads = jax.value_and_grad(objective)(trainable, frozen, *batch)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return TrainStep(init=tx.init, step=step)


def loraplus_labels(trainable: PyTree) -> PyTree:
    """LoRA+ groups for a trainable tree (`split`'s, or any tree of `init` adapters):
    "embedding" for the factors of an adapted embedding table, "B" for lora_B (and its bias) and every
    leaf that is 1-D per layer (DoRA magnitudes, KaSA's diagonal, biases and norm scales, a layer
    stack's [L, n] ones too), "A" for the rest (lora_A, AdaLoRA's lora_E, fully trained matrices); PEFT's,
    which tests torch's per-layer `param.ndim == 1`."""
    # A stacked adapter's leaves carry lora_A's stack dims [*S, in, r]: PEFT sees one layer's shape.
    stack = {p.rsplit("/", 1)[0]: x.ndim - 2 for p, x in tree.flatten(trainable).items()
             if tree.leaf_name(p) == "lora_A"}

    def group(path, x):
        module, _, leaf = path.rpartition("/")
        if leaf in ("lora_A", "lora_B") and tree.leaf_name(module) == tree.EMBEDDING_NAME:
            return "embedding"  # ".../wte/embedding/lora_A": the adapted leaf, then the factor
        if leaf.startswith("lora_B"):  # lora_B, lora_B_bias
            return "B"
        if leaf == ADALORA_E:  # (r, 1) in PEFT: not 1-D
            return "A"
        # Flax's biases and norm scales are 1-D per layer, [L, n] in a scanned stack (trained extras)
        vector = getattr(x, "ndim", 0) - stack.get(module, 0) == 1 or leaf in ("bias", "scale")
        return "B" if vector else "A"
    return tree.map_with_path(group, trainable)


def loraplus(make_tx: Callable[[optax.ScalarOrSchedule], optax.GradientTransformation], lr: optax.ScalarOrSchedule,
             ratio: float = 16.0, *, embedding_lr: float = 1e-6) -> optax.GradientTransformation:
    """LoRA+ (Hayou et al. 2024; PEFT's `create_loraplus_optimizer`): lora_B learns `ratio` times
    faster than lora_A.

    Args:
      make_tx: builds the optimizer for one learning rate, e.g. `lambda lr: optax.adamw(lr)`.
      lr: learning rate (or optax schedule) of lora_A and fully trained matrices.
      ratio: lr_B / lr_A (the paper suggests 16 with Adam; PEFT's `loraplus_lr_ratio`); lora_B and
        1-D trained leaves (DoRA magnitudes, biases) get lr * ratio.
      embedding_lr: the rate of LoRA factors on embedding tables (PEFT's `loraplus_lr_embedding`).
    Returns:
      one optax transformation over the trainable tree (groups from `loraplus_labels`).
    """
    if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and ratio > 0):
        raise ValueError(f"loraplus: ratio must be a positive number, got {ratio!r}")
    lr_b = (lambda count: ratio * lr(count)) if callable(lr) else lr * ratio
    return optax.multi_transform({"A": make_tx(lr), "B": make_tx(lr_b), "embedding": make_tx(embedding_lr)},
                                 loraplus_labels)


def _adapter_dicts(t: PyTree) -> dict[str, Any]:
    """The {path: factors} dict of a trainable tree (`split`'s) or of a bare adapters tree."""
    return t["adapters"] if isinstance(t, dict) and isinstance(t.get("adapters"), dict) else t


def _labels_freezing(leaf: str) -> Callable[[PyTree], PyTree]:
    """labels(trainable): "frozen" for every adapter leaf named `leaf`, "train" for the rest."""
    return lambda t: tree.map_with_path(lambda p, _: "frozen" if p.rsplit("/", 1)[-1] == leaf else "train", t)


lorafa_labels = _labels_freezing("lora_A")  # LoRA-FA groups: lora_A "frozen", every other leaf "train"


def mica(config: LoraConfig, tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """MiCA (PEFT's `init_lora_weights="mica"`): lora_B, W0's minor singular directions, stays as
    `init` made it; `tx` updates lora_A and the other trained leaves. lora_B gets no update and no
    optimizer state (nor does its gradient reach `tx`'s clipping); under `jit` that gradient is
    dead code XLA removes."""
    if config.init != MICA:
        raise ValueError(f"mica: the config's init is {config.init!r}, not 'mica' (whose lora_B this keeps fixed)")
    return optax.multi_transform({"frozen": optax.set_to_zero(), "train": tx}, _labels_freezing("lora_B"))


def lorafa(config: LoraConfig, tx: optax.GradientTransformation, *, delta: float = 1e-8
           ) -> optax.GradientTransformation:
    """LoRA-FA (Zhang et al. 2023; PEFT's `create_lorafa_optimizer`): lora_A stays frozen at its
    init and lora_B's gradient becomes the closest to full fine-tuning's that a fixed A allows,
    g_B <- (A^T A + delta I)^+ g_B / s^2, before `tx` (AdamW in PEFT) updates B and the other
    trained leaves.

    lora_A gets no update and no optimizer state; under `jit` its gradient is dead code that XLA
    removes, and with it the layer inputs kept only to compute it. Pass the trainable tree (or
    bare adapters) as optax's `params`, as `make_train_step` does.
    """
    if not (isinstance(delta, (int, float)) and math.isfinite(delta) and delta >= 0):
        raise ValueError(f"lorafa: delta must be a number >= 0, got {delta!r}")
    if config.use_kasa or config.adalora is not None:
        raise ValueError("lorafa projects lora_B's gradient through A alone; a KaSA or AdaLoRA update A diag(d) B "
                         "also trains d: not with use_kasa or adalora")
    if config.use_bdlora is not None:
        raise ValueError("lorafa projects lora_B's gradient through A across all r rows, which a BD-LoRA "
                         "(use_bdlora) block-diagonal B cannot follow")
    if config.init == MICA:
        raise ValueError("lorafa trains lora_B alone, MiCA (init='mica') lora_A alone: use one or the other")

    def refuse_tables(params):
        # an embedding table's lora_A starts at 0 (PEFT's init) and, frozen, stays there: B's gradient is 0 too
        tables = [p for p, f in _adapter_dicts(params).items()
                  if isinstance(f, dict) and "lora_A" in f and tree.leaf_name(p) == tree.EMBEDDING_NAME]
        if tables and config.init in PLAIN_INITS:
            raise ValueError(f"lorafa freezes lora_A, which a LoRA on an embedding table starts at zero: {tables[0]!r} "
                             "would never train (nor does it under PEFT's LoRA-FA); leave the table out of the targets")
        return optax.EmptyState()

    def project(updates, state, params=None):
        if params is None:
            raise ValueError("lorafa projects lora_B's gradient through lora_A: pass params to update()")
        grads, factors = _adapter_dicts(updates), _adapter_dicts(params)
        out = {}
        for p, g in grads.items():
            if not (isinstance(g, dict) and "lora_A" in g and "lora_B" in g):
                out[p] = g
                continue
            a = factors[p]["lora_A"].astype(jnp.float32)  # [*S, in, r]
            r = a.shape[-1]
            ata_inv = jnp.linalg.pinv(jnp.swapaxes(a, -1, -2) @ a + delta * jnp.eye(r))  # [*S, r, r]
            g_b = ata_inv @ g["lora_B"].astype(jnp.float32) / config.scale_for(p) ** 2  # [*S, r, out]
            out[p] = {**g, "lora_B": g_b.astype(g["lora_B"].dtype)}
        new = {**updates, "adapters": out} if grads is not updates else out
        return new, state

    return optax.chain(optax.GradientTransformation(refuse_tables, project),
                       optax.multi_transform({"frozen": optax.set_to_zero(), "train": tx}, lorafa_labels))
