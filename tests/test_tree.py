"""tree: path names of arbitrary pytrees, all-linear selection, partition/combine round trips."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import nnx

import lora_jax as lj
from lora_jax import quant, tree

W = np.ones((4, 4), np.float32)


def test_a_dict_key_named_value_keeps_its_name():
    """Only nnx.Variable's `.value` attribute is dropped from a path, not a parameter named 'value'."""
    params = {"attn": {"query": W, "value": W}}
    assert list(tree.flatten(params)) == ["attn/query", "attn/value"]
    config = lj.LoraConfig(rank=2, targets=[], target_parameters=["attn/value"])
    assert lj.target_paths(config, params) == ["attn/value"]
    state = nnx.state(nnx.Linear(4, 4, rngs=nnx.Rngs(0)))  # kernel/value -> kernel
    assert list(tree.flatten(state)) == ["bias", "kernel"]


def test_two_leaves_with_one_name_are_refused():
    """A dict key holding '/' could name the same path as a nested leaf: refused, naming both."""
    with pytest.raises(ValueError, match=r"share the path name 'a/b': \['a'\]\['b'\] and \['a/b'\]"):
        tree.flatten({"a/b": W, "a": {"b": 2 * W}})


def test_all_linear_leaves_a_linen_head_out():
    """Under linen's `params` collection the task head is still the top module: not targeted."""

    class Clf(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2, name="score")(nn.Dense(4, name="body")(x))

    variables = Clf().init(jax.random.key(0), W)
    assert lj.target_paths(lj.LoraConfig(rank=2, targets="all-linear"), variables) == ["params/body/kernel"]


def test_partition_combine_round_trip_a_quantized_leaf():
    """combine(*partition(...)) rebuilds the tree when the selected part holds a quantized weight."""
    params = {"a": {"kernel": np.ones((64, 64), np.float32), "bias": np.zeros(64, np.float32)},
              "b": {"kernel": np.ones((64, 64), np.float32)}, "c": None}
    q = quant.quantize(params, ["a"])
    assert isinstance(q["a"]["kernel"], quant.QuantizedArray)
    sel, rest = tree.partition(q, tree.mask(q, ["a"]))
    for back in (tree.combine(sel, rest), tree.combine(rest, sel)):
        assert jax.tree.structure(back) == jax.tree.structure(q)
        jax.tree.map(np.testing.assert_array_equal, back, q)
