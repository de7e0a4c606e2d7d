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

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax

from . import tree
from .config import LoraConfig
from .lora import Adapters, trainable_mask

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
