"""reduce_intruders (PEFT's reduce_intruder_dimension): PEFT's result, stacks, layer gates, refusals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax import peft as lp
from lora_jax.models import from_pretrained

IDS = np.array([[5, 9, 17, 33, 2, 7], [40, 41, 42, 3, 3, 3]])


def _random(config, params, seed, size=0.3):
    """Trained-looking adapters: both factors random, big enough to bring in new directions."""
    adapters = lj.init(config, params, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 2 * len(adapters)))
    return {p: {k: size * jax.random.normal(next(keys), v.shape) for k, v in ab.items()} for p, ab in adapters.items()}


@pytest.mark.parametrize("kwargs", [{}, {"top_k": 3, "threshold_epsilon": 0.6, "mitigation_lambda": 0.5}])
def test_matches_peft(kwargs, tiny_bloom_dir, tmp_path, nudge_torch):
    """Same intruder counts and logits as PEFT's function on the same adapter, a matrix without
    intruders (lora_B = 0 there) keeping its factors exactly."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.intruders import reduce_intruder_dimension
    from transformers import AutoModelForCausalLM

    pm = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_bloom_dir, attn_implementation="eager"),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value", "dense_h_to_4h"]))
    pm = nudge_torch(pm, seed=3)
    quiet = pm.base_model.model.transformer.h[1].mlp.dense_h_to_4h
    with torch.no_grad():
        quiet.lora_B["default"].weight.zero_()
    pm.save_pretrained(tmp_path)
    log: list[str] = []
    reduce_intruder_dimension(pm, logging_sink=log.append, **kwargs)
    theirs = {m.split(": ")[0].replace("base_model.model.", "").replace(".", "/") + "/kernel":
              int(m.split(": Intruders: ")[1]) if "Intruders: " in m else 0 for m in log[:-1]}
    with torch.no_grad():
        want = pm.eval()(torch.tensor(IDS, dtype=torch.long)).logits.numpy()

    model, params = from_pretrained(tiny_bloom_dir)
    got = lp.load_peft(tmp_path, params)
    new, found = lj.reduce_intruders(got.config, params, got.adapters, **kwargs)
    assert {p: int(n) for p, n in found.items()} == theirs
    assert theirs.pop("transformer/h/1/mlp/dense_h_to_4h/kernel") == 0 and min(theirs.values()) > 0
    quiet_path = "transformer/h/1/mlp/dense_h_to_4h/kernel"
    for k in ("lora_A", "lora_B"):
        np.testing.assert_array_equal(new[quiet_path][k], got.adapters[quiet_path][k])
    g = jax.jit(lj.apply(model.apply, got.config, strict=True))
    np.testing.assert_allclose(np.asarray(g(params, new, IDS)), want, atol=1e-4, rtol=0)
    assert np.abs(np.asarray(g(params, got.adapters, IDS)) - want).max() > 1e-2  # the mitigation changed them


def test_stacks_layer_gates_and_lambda_one(tiny_gpt2_dir):
    """A scanned stack gives the unrolled layers' result (GPT-2, which PEFT's own function
    mis-shapes); a layer left out by layers_to_transform keeps zero factors and no intruders;
    mitigation_lambda=1 keeps every delta (refactored) and dtypes stay."""
    model, params = from_pretrained(tiny_gpt2_dir)
    config = lj.LoraConfig(rank=4, alpha=8, targets=["c_attn", "c_fc"])
    adapters = _random(config, params, seed=0)
    new, found = lj.reduce_intruders(config, params, adapters)
    assert all(n.shape == () for n in found.values()) and sum(int(n) for n in found.values()) > 0

    _, scanned = from_pretrained(tiny_gpt2_dir, scan_layers=True)
    stacked = {p.replace("h/0/", "h/"): {k: jnp.stack([v, adapters[p.replace("h/0/", "h/1/")][k]])
                                         for k, v in ab.items()}
               for p, ab in adapters.items() if "/h/0/" in p}
    new_s, found_s = lj.reduce_intruders(config, scanned, stacked)
    for p, n in found_s.items():
        assert n.tolist() == [int(found[p.replace("h/", "h/0/")]), int(found[p.replace("h/", "h/1/")])]
        for k in ("lora_A", "lora_B"):
            for i in (0, 1):
                np.testing.assert_allclose(new_s[p][k][i], new[p.replace("h/", f"h/{i}/")][k], atol=1e-5)

    gated = lj.LoraConfig(rank=4, alpha=8, targets=["c_attn"], layers_to_transform=[1])
    g_adapters = _random(gated, scanned, seed=1)
    g_adapters = {p: {k: v.at[0].set(0.0) for k, v in ab.items()} for p, ab in g_adapters.items()}
    g_new, g_found = lj.reduce_intruders(gated, scanned, g_adapters)
    (p, n), = g_found.items()
    assert n[0] == 0 and n[1] > 0
    assert not np.asarray(g_new[p]["lora_A"][0]).any() and not np.asarray(g_new[p]["lora_B"][0]).any()

    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), adapters)
    kept, _ = lj.reduce_intruders(config, params, bf16, mitigation_lambda=1.0)
    for p, ab in kept.items():
        assert ab["lora_A"].dtype == jnp.bfloat16 and ab["lora_A"].shape == adapters[p]["lora_A"].shape
        delta = lambda a: np.asarray(a["lora_A"], np.float32) @ np.asarray(a["lora_B"], np.float32)  # noqa: E731
        np.testing.assert_allclose(delta(ab), delta(bf16[p]), atol=0.05 * np.abs(delta(bf16[p])).max())


def test_refusals(tiny_gpt2_dir):
    _, params = from_pretrained(tiny_gpt2_dir)
    dora = lj.LoraConfig(rank=2, targets=["c_attn"], use_dora=True)
    with pytest.raises(ValueError, match="DoRA.*lora_magnitude_vector"):
        lj.reduce_intruders(dora, params, lj.init(dora, params, jax.random.key(0)))
    config = lj.LoraConfig(rank=2, targets=["c_attn"])
    adapters = lj.init(config, params, jax.random.key(0))
    with pytest.raises(ValueError, match="mitigation_lambda=1.5"):
        lj.reduce_intruders(config, params, adapters, mitigation_lambda=1.5)
    with pytest.raises(ValueError, match="c_fc"):
        lj.reduce_intruders(config, params, adapters | {"transformer/h/0/mlp/c_fc/kernel": adapters[
            "transformer/h/0/attn/c_attn/kernel"]})
