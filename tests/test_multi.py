"""Several named adapters on one base: switch, disable, mixed batches, combinations, loading."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax import checkpoint, multi
from lora_jax.models import CausalLM, GPT2Config, stack_layers

RNG = np.random.default_rng(0)
IDS = RNG.integers(0, 64, size=(6, 5)).astype(np.int32)
CONFIGS = {  # different ranks, scales (one rsLoRA) and targets
    "a": lj.LoraConfig(rank=4, alpha=8, targets=["c_attn"]),
    "b": lj.LoraConfig(rank=2, alpha=4, targets=["c_attn", "c_fc"], use_rslora=True),
    "c": lj.LoraConfig(rank=3, alpha=6, targets=["mlp/c_proj"]),
}


@pytest.fixture(scope="module")
def setup():
    cfg = GPT2Config(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                     max_position_embeddings=8)
    model = CausalLM(cfg)
    shapes = model.param_shapes()
    # numpy values: one XLA compile per random shape would dominate this test's runtime.
    params = jax.tree.map(lambda s: jnp.asarray(RNG.normal(0, 0.3, s.shape), s.dtype), shapes)
    bank = {n: jax.tree.map(lambda s: jnp.asarray(RNG.normal(0, 0.5, s.shape), s.dtype),
                            jax.eval_shape(lambda c=c: lj.init(c, shapes, jax.random.key(0))))
            for n, c in CONFIGS.items()}
    ref = {n: np.asarray(jax.jit(lj.apply(model.apply, c, strategy="merged"))(params, bank[n], IDS))
           for n, c in CONFIGS.items()}
    ref[None] = np.asarray(jax.jit(model.apply)(params, IDS))
    return model, params, bank, ref


def test_switch_and_disable(setup):
    model, params, bank, ref = setup
    m = multi.multi(model.apply, CONFIGS)
    switch = jax.jit(m.switch, static_argnames="adapter")
    np.testing.assert_allclose(switch(params, bank, IDS, adapter="b"), ref["b"], atol=1e-5)
    np.testing.assert_allclose(switch(params, bank, IDS, adapter=None), ref[None], atol=1e-6)
    assert np.abs(ref["b"] - ref[None]).max() > 1e-2
    with pytest.raises(ValueError, match="unknown adapter 'z'"):
        m.switch(params, bank, IDS, adapter="z")


def stacked(adapters):
    """Per-layer adapters `h/{i}/...` -> stacked `h/...` [L, ...], as for a scanned base."""
    layer = lambda p: int(re.search(r"/h/(\d+)/", p).group(1))
    groups = {}
    for p in sorted(adapters, key=layer):
        groups.setdefault(re.sub(r"/h/\d+/", "/h/", p), []).append(adapters[p])
    return {q: {k: jnp.stack([ab[k] for ab in abs_]) for k in ("lora_A", "lora_B")} for q, abs_ in groups.items()}


@pytest.mark.parametrize("scan", [False, True])
def test_mixed_batch_equals_each_example_with_its_adapter(setup, scan):
    model, params, bank, ref = setup
    if scan:
        model = CausalLM(model.config.replace(scan_layers=True))
        params = stack_layers(params)
        bank = {n: stacked(ab) for n, ab in bank.items()}
    m = multi.multi(model.apply, CONFIGS)
    names = ["a", None, "c", "b", "a", None]
    ids = m.ids(names)
    ids[5] = len(CONFIGS)  # N also means "no adapter"
    out = np.asarray(jax.jit(m.mixed)(params, bank, IDS, adapter_ids=ids))
    for i, n in enumerate(names):
        np.testing.assert_allclose(out[i], ref[n][i], atol=1e-5, err_msg=f"example {i} ({n})")


def test_mixed_batch_refuses_other_uses(setup):
    model, params, bank, _ = setup
    m = multi.multi(lambda p, x: x @ p["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"].T, CONFIGS)
    with pytest.raises(multi.MixedBatchError, match="c_attn"):
        m.mixed(params, bank, jnp.ones((2, 48)), adapter_ids=np.array([0, 1]))
    full = multi.multi(model.apply, {"a": lj.LoraConfig(rank=2, targets=["c_attn"], bias="all")})
    with pytest.raises(ValueError, match="train full leaves"):
        full.mixed(params, {"a": bank["a"]}, IDS, adapter_ids=np.zeros(6, np.int32))


def _delta(config, params, adapters):
    merged = lj.merge(config, jax.tree.map(jnp.array, params), adapters)
    return {p: np.asarray(merged_w) - np.asarray(w) for (p, w), merged_w in
            zip(lj.tree.flatten(params).items(), lj.tree.flatten(merged).values())}


@pytest.mark.parametrize("how", ["linear", "cat"])
def test_combine_is_the_weighted_sum_of_deltas(setup, how):
    _, params, bank, _ = setup
    weights = {"a": 0.7, "b": -0.4, "c": 1.5}
    config, combined = multi.combine(CONFIGS, bank, weights, how=how)
    want = {p: sum(w * _delta(CONFIGS[n], params, bank[n])[p] for n, w in weights.items())
            for p in lj.tree.flatten(params)}
    got = _delta(config, params, combined)
    for p in want:
        np.testing.assert_allclose(got[p], want[p], atol=1e-5, err_msg=p)
    ranks = {p: ab["lora_A"].shape[-1] for p, ab in combined.items()}
    if how == "cat":  # PEFT's layout: every path gets the sum of all ranks
        assert set(ranks.values()) == {4 + 2 + 3}
    else:  # only the adapters present at the path
        assert ranks["transformer/h/0/attn/c_attn/kernel"] == 6 and ranks["transformer/h/0/mlp/c_fc/kernel"] == 2


def test_cat_matches_peft_add_weighted_adapter(tmp_path, tiny_gpt2_dir):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from lora_jax import peft as lp
    from lora_jax.models import from_pretrained

    model, params = from_pretrained(tiny_gpt2_dir)
    shapes = jax.eval_shape(lambda: params)
    configs = {"a": CONFIGS["a"], "b": lj.LoraConfig(rank=2, alpha=4, targets=["c_attn", "c_fc"])}
    bank = {n: jax.tree.map(lambda s: jnp.asarray(RNG.normal(0, 0.5, s.shape), s.dtype),
                            jax.eval_shape(lambda c=c: lj.init(c, shapes, jax.random.key(0))))
            for n, c in configs.items()}
    for n in configs:
        lp.save_peft(tmp_path / n, configs[n], bank[n], model_config=model.config, params=params)
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir, attn_implementation="eager")
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "a"), adapter_name="a")
    pm.load_adapter(str(tmp_path / "b"), adapter_name="b")
    pm.add_weighted_adapter(["a", "b"], [0.7, -0.4], "ab", combination_type="cat")
    config, combined = multi.combine(configs, bank, {"a": 0.7, "b": -0.4}, how="cat")
    ours = lp.peft_state_dict(config, combined)
    theirs = {k.replace(".ab.", "."): v.detach().numpy() for k, v in pm.state_dict().items() if ".ab." in k}
    assert sorted(ours) == sorted(theirs)
    for k in ours:
        np.testing.assert_allclose(ours[k], theirs[k], atol=1e-6, err_msg=k)
    assert pm.peft_config["ab"].r == config.rank == 6


def test_load_bank_reads_both_formats(setup, tmp_path):
    model, params, bank, ref = setup
    from lora_jax import peft as lp

    checkpoint.save(tmp_path / "a", CONFIGS["a"], bank["a"])
    lp.save_peft(tmp_path / "b", CONFIGS["b"], bank["b"], model_config=model.config, params=params)
    got = multi.load_bank({"a": tmp_path / "a", "b": tmp_path / "b"}, params)
    m = multi.multi(model.apply, got.configs)
    out = np.asarray(jax.jit(m.mixed)(params, got.adapters, IDS, adapter_ids=m.ids(["b", "a", None, "a", "b", "b"])))
    for i, n in enumerate(["b", "a", None, "a", "b", "b"]):
        np.testing.assert_allclose(out[i], ref[n][i], atol=1e-5)
    with pytest.raises(FileNotFoundError, match="neither"):
        multi.load_bank({"x": tmp_path}, params)
