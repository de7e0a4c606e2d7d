"""Optimizer wiring beyond tests/test_lora.py: LoRA+ groups on layer stacks and AdaLoRA adapters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest

import lora_jax as lj

KEY = jax.random.key(0)


def _stacked(layers: int = 3) -> dict:
    """A scanned stack of `layers` linear layers with biases and a norm, and two unstacked layers."""
    return {"h": {"attn": {"kernel": jnp.ones((layers, 4, 6)), "bias": jnp.ones((layers, 6))},
                  "ln": {"scale": jnp.ones((layers, 4)), "bias": jnp.ones((layers, 4))}},
            "head": {"kernel": jnp.ones((4, 5)), "bias": jnp.ones((5,))}, "out": {"kernel": jnp.ones((5, 3))}}


def test_loraplus_groups_per_layer_on_stacks_and_adalora():
    """PEFT groups by one layer's torch shapes (`param.ndim == 1` -> lr * ratio): a scanned stack's
    DoRA magnitudes [L, out], biases and norm scales [L, n] go with lora_B, as their unstacked
    twins do; AdaLoRA's lora_E ((r, 1) in PEFT) goes with lora_A."""
    params = _stacked()
    config = lj.LoraConfig(rank=2, targets=["attn", "head"], use_dora=True, bias="all",
                           trainable=["out/kernel", "h/ln/scale"])
    trainable, _ = lj.split(config, params, lj.init(config, params, KEY))
    groups = lj.optim.loraplus_labels(trainable)
    for p in ("h/attn/kernel", "head/kernel"):  # stacked and not: the same groups
        assert groups["adapters"][p] == {"lora_A": "A", "lora_B": "B", lj.MAGNITUDE: "B"}, p
    assert groups["params"]["h"] == {"attn": {"kernel": None, "bias": "B"}, "ln": {"scale": "B", "bias": "B"}}
    assert groups["params"]["head"] == {"kernel": None, "bias": "B"} and groups["params"]["out"] == {"kernel": "A"}

    sgd = lj.loraplus(optax.sgd, 0.1, ratio=4.0)  # the rates themselves, on all-ones gradients
    updates, _ = sgd.update(jax.tree.map(jnp.ones_like, trainable), sgd.init(trainable), trainable)
    assert float(updates["adapters"]["h/attn/kernel"][lj.MAGNITUDE][0, 0]) == pytest.approx(-0.4)
    assert float(updates["params"]["h"]["ln"]["scale"][0, 0]) == pytest.approx(-0.4)

    ada = lj.LoraConfig(rank=2, targets=["head"], adalora={"target_r": 1, "total_step": 10})
    assert lj.optim.loraplus_labels(lj.init(ada, params, KEY))["head/kernel"] == {
        "lora_A": "A", "lora_B": "B", lj.ADALORA_E: "A"}
