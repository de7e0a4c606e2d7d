"""Property test: random nested parameter trees and target sets round-trip through the transform."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import event, given, settings
from hypothesis import strategies as st

import lora_jax as lj

NAMES = st.sampled_from(["attn", "mlp", "dense", "proj", "q", "v", "block", "ln"])


@st.composite
def param_trees(draw):
    """A nested dict of kernels [in, out] / stacks [L, in, out] and a few non-matrix leaves."""
    leaves = {}
    for _ in range(draw(st.integers(1, 5))):
        path = tuple(draw(st.lists(NAMES, min_size=1, max_size=3)))
        stack = draw(st.sampled_from([(), (2,)]))
        shape = (*stack, draw(st.integers(2, 6)), draw(st.integers(2, 6)))
        leaves[path + ("kernel",)] = shape
        leaves[path + ("bias",)] = (shape[-1],)
    tree: dict = {}
    for i, (path, shape) in enumerate(sorted(leaves.items())):
        node = tree
        ok = True
        for p in path[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                ok = False
                break
            node = nxt
        if ok and path[-1] not in node:
            node[path[-1]] = np.asarray(jax.random.normal(jax.random.key(i), shape), np.float32)
    return tree


@settings(max_examples=25, deadline=None)
@given(params=param_trees(), data=st.data())
def test_init_apply_merge_unmerge_round_trip(params, data):
    kernels = [p for p in lj.tree.flatten(params) if p.endswith("kernel")]
    chosen = data.draw(st.lists(st.sampled_from(kernels), min_size=1, unique=True))
    max_rank = min(min(lj.tree.flatten(params)[p].shape[-2:]) for p in chosen)
    # BD-LoRA with 2 blocks: an even rank, and even inputs (block-diagonal A) or outputs (B)
    sides = [s for s, i in (("a", -2), ("b", -1)) if all(lj.tree.flatten(params)[p].shape[i] % 2 == 0 for p in chosen)]
    # KaSA keeps at least one singular component: r < min
    variant = data.draw(st.sampled_from(["plain", "adalora", *(["kasa"] if max_rank > 1 else []),
                                         *(["bdlora"] if max_rank > 1 and sides else [])]))
    kasa, ada, bd = variant == "kasa", variant == "adalora", None
    rank = data.draw(st.integers(1, max_rank - kasa))
    if variant == "bdlora":
        rank = 2 * max(1, rank // 2)
        side = data.draw(st.sampled_from(sides))
        bd = lj.BdLoraConfig(**{f"target_modules_bd_{side}": [lj.bdlora.module_name(p) for p in chosen]}, nblocks=2)
    config = lj.LoraConfig(rank=rank, alpha=data.draw(st.sampled_from([1.0, 4.0, 16.0])), targets="|".join(chosen),
                           use_rslora=not ada and data.draw(st.booleans()), use_kasa=kasa,
                           adalora={"target_r": 1, "total_step": 2} if ada else None, use_bdlora=bd)
    event(f"variant={variant}")
    if kasa:  # the round trip then runs on the truncated base, with a diagonal between A and B
        params, adapters = lj.init_kasa(config, params, jax.random.key(0))
        params = jax.tree.map(np.asarray, params)
    else:
        adapters = lj.init(config, params, jax.random.key(0))
    assert sorted(adapters) == sorted(chosen)
    leaves, treedef = jax.tree.flatten(adapters)
    adapters = jax.tree.unflatten(treedef, [x + 0.1 for x in leaves])  # nonzero B

    def f(p, x):  # every kernel used in a matmul: [*S, in] . [*S, in, out]
        return [jnp.einsum("...i,...io->...o", x * jnp.ones(k.shape[:-1]), k)
                for k in jax.tree.leaves(p) if k.ndim >= 2]

    x = jnp.float32(0.5)
    merged = lj.merge(config, jax.tree.map(jnp.asarray, params), adapters)
    for a, b in zip(lj.apply(f, config)(params, adapters, x), f(merged, x)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    back = lj.unmerge(config, merged, adapters)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), back, params)
