"""Several named adapters on one base: switch, disable, mixed batches, combinations, loading."""

from __future__ import annotations

import contextlib
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


@pytest.mark.parametrize("scan,remat", [(False, False), (True, False), (False, True)])
def test_mixed_batch_equals_each_example_with_its_adapter(setup, scan, remat):
    model, params, bank, ref = setup
    model = CausalLM(model.config.replace(remat=remat))  # remat: the factors enter each layer's checkpoint
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


def test_mixed_batch_routes_embedding_rows_per_example(setup):
    """An adapter on the (tied) embedding table in a mixed batch: each example's lookup and LM head use its
    own adapter's rows (PEFT's Embedding mixed-batch forward); "__base__" (PEFT's name) runs the base."""
    model, params, bank, ref = setup
    emb = lj.LoraConfig(rank=2, alpha=4, targets=["wte", "c_fc"])
    configs = {"a": CONFIGS["a"], "e": emb}
    bank = {"a": bank["a"], "e": jax.tree.map(lambda s: jnp.asarray(RNG.normal(0, 0.5, s.shape), s.dtype),
                                              jax.eval_shape(lambda: lj.init(emb, params, jax.random.key(0))))}
    assert "transformer/wte/embedding" in bank["e"]
    ref = {**ref, "e": np.asarray(jax.jit(lj.apply(model.apply, emb))(params, bank["e"], IDS))}
    m = multi.multi(model.apply, configs)
    names = ["e", None, "a", "e", "__base__", "a"]
    ids = m.ids(names)
    assert ids.tolist() == [1, -1, 0, 1, -1, 0]
    out = np.asarray(jax.jit(m.mixed)(params, bank, IDS, adapter_ids=ids))
    for i, n in enumerate(names):
        np.testing.assert_allclose(out[i], ref[None if n == "__base__" else n][i], atol=1e-5, err_msg=f"example {i}")


@pytest.mark.parametrize("scan", [False, True])
def test_hotswappable_adapters_share_one_compile(setup, scan):
    """Adapters of different ranks, scales and targets, made one shape: one trace, one compile,
    each adapter's own output (the scanned base too); a larger rank pads, a smaller one is refused."""
    model, params, bank, ref = setup
    if scan:
        model = CausalLM(model.config.replace(scan_layers=True))
        params = stack_layers(params)
        bank = {n: stacked(ab) for n, ab in bank.items()}
    config, same = multi.hotswappable(CONFIGS, bank, rank=5)
    assert config.rank == 5 and config.scale_for("x") == 1.0
    shapes = {n: jax.tree.map(jnp.shape, ab) for n, ab in same.items()}
    assert shapes["a"] == shapes["b"] == shapes["c"] and len(same["a"]) == (3 if scan else 6)
    traces = []

    def f(p, a, x):
        traces.append(1)
        return lj.apply(model.apply, config)(p, a, x)
    g = jax.jit(f)
    for n in ["a", "b", "c", "a"]:
        np.testing.assert_allclose(g(params, same[n], IDS), ref[n], atol=1e-5, err_msg=n)
    assert len(traces) == 1
    with pytest.raises(ValueError, match="rank=3 is below the largest adapter rank 4"):
        multi.hotswappable(CONFIGS, bank, rank=3)


def test_mixed_batch_generates_each_row_with_its_adapter(setup):
    """KV-cache generation over a mixed batch, greedy and by beam search: each row's tokens are those
    its adapter alone gives."""
    from lora_jax.models import beam_search, generate

    model, params, bank, _ = setup
    m = multi.multi(model.apply, CONFIGS)
    names = ["b", None, "a", "c"]
    ids, mask = jnp.asarray(IDS[:4]), jnp.ones((4, IDS.shape[1]), jnp.int32)
    aid = m.ids(names)
    kw = dict(model=model, max_new_tokens=3, eos_token_id=None)
    out = generate(lambda p, *a, **k: m.mixed(p, bank, *a, adapter_ids=aid, **k), params, ids, mask, **kw)
    # Beam search runs on the 4 prompts, then on 4 * 3 beams (row b * 3 + k): the ids follow the rows.
    beams, _ = beam_search(lambda p, x, *a, **k: m.mixed(p, bank, x, *a, **k,
                                                         adapter_ids=jnp.repeat(aid, x.shape[0] // len(aid))),
                           params, ids, mask, num_beams=3, **kw)
    for i, n in enumerate(names):
        f = model.apply if n is None else (
            lambda p, *a, n=n, **k: lj.apply(model.apply, CONFIGS[n])(p, bank[n], *a, **k))
        one = generate(f, params, ids[i:i + 1], mask[i:i + 1], **kw)
        np.testing.assert_array_equal(out[i], one[0], err_msg=f"row {i} ({n})")
        one, _ = beam_search(f, params, ids[i:i + 1], mask[i:i + 1], num_beams=3, **kw)
        np.testing.assert_array_equal(beams[i], one[0], err_msg=f"row {i} ({n}), beam search")
    assert len({tuple(np.asarray(r)) for r in out}) > 1
    assert len({tuple(np.asarray(r[0])) for r in beams}) > 1


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


def test_svd_combination_is_the_best_rank_r_fit_per_layer(setup):
    """At a rank no smaller than the summed ranks, `svd` is the exact weighted sum; below it, the
    truncated SVD of that sum (Eckart-Young: the residual is the dropped singular values); a
    stacked (scanned) bank gives each layer what it gives unrolled."""
    _, params, bank, _ = setup
    weights = {"a": 0.7, "b": -0.4, "c": 1.5}
    exact_cfg, exact = multi.combine(CONFIGS, bank, weights, how="linear")
    want = _delta(exact_cfg, params, exact)
    config, combined = multi.combine(CONFIGS, bank, weights, how="svd", rank=6)  # 4 + 2 at c_attn
    got = _delta(config, params, combined)
    for p in want:
        np.testing.assert_allclose(got[p], want[p], atol=1e-5, err_msg=p)
    config, low = multi.combine(CONFIGS, bank, weights, how="svd", rank=2)
    assert config.rank == 2 and config.scale_for("x") == 1.0 and not config.rank_pattern
    got = _delta(config, params, low)
    for p in low:
        s = np.linalg.svd(want[p], compute_uv=False)
        assert np.isclose(np.linalg.norm(got[p] - want[p]), np.sqrt(np.sum(s[2:] ** 2)), rtol=1e-4, atol=1e-5), p
    _, low_stacked = multi.combine(CONFIGS, {n: stacked(ab) for n, ab in bank.items()}, weights, how="svd", rank=2)
    for q, ab in low_stacked.items():
        for i in range(2):
            p = q.replace("/h/", f"/h/{i}/")
            np.testing.assert_allclose(ab["lora_A"][i] @ ab["lora_B"][i], low[p]["lora_A"] @ low[p]["lora_B"],
                                       atol=1e-5, err_msg=p)


def test_pruning_and_sign_election():
    from lora_jax import merging

    x = jnp.asarray(RNG.normal(size=(3, 2, 8, 8)), jnp.float32)  # [N, L, m, n]
    kept = np.asarray(merging.magnitude_prune_each(x, 0.25))
    for n in range(3):
        for layer in range(2):  # each layer's matrix keeps its own top 16 of 64
            nz = kept[n, layer] != 0
            assert nz.sum() == 16
            assert np.abs(x[n, layer])[nz].min() >= np.abs(x[n, layer])[~nz].max()
    big = jnp.ones((1, 200, 200))
    dropped = np.asarray(merging.random_prune_each(big, 0.3, jax.random.key(0)))
    assert set(np.unique(dropped)) <= {0.0, np.float32(1 / 0.3)} and abs((dropped != 0).mean() - 0.3) < 0.01
    assert np.array_equal(dropped, merging.random_prune_each(big, 0.3, jax.random.key(0)))
    assert not np.array_equal(dropped, merging.random_prune_each(big, 0.3, jax.random.key(1)))
    # TIES by hand: entry 0 [1, 3, -1] elects + either way; entry 1 [5, -1, -1] elects + by total, - by count
    t = jnp.asarray([[[1.0, 5.0]], [[3.0, -1.0]], [[-1.0, -1.0]]])  # [N=3, 1, 2]
    w = jnp.asarray([1.0, 2.0, 0.5])
    np.testing.assert_allclose(merging.merge("ties", t, w, density=1.0), [[(1 + 6) / 2, 5.0]])
    np.testing.assert_allclose(merging.merge("ties", t, w, density=1.0, majority_sign="frequency"),
                               [[(1 + 6) / 2, (-2 - 0.5) / 2]])
    np.testing.assert_allclose(merging.merge("linear", t, w), [[1 + 6 - 0.5, 5 - 2 - 0.5]])


def test_combination_errors(setup):
    _, _, bank, _ = setup
    w = {"a": 0.5, "b": 0.5}
    bad = [
        (dict(how="ties"), r"'ties' needs density in \[0, 1\]"),
        (dict(how="dare_linear", density=0.0, key=jax.random.key(0)), r"needs density in \(0, 1\]"),
        (dict(how="dare_ties_svd", density=0.5), "pass key="),
        (dict(how="linear", rank=2), "does no SVD"),
        (dict(how="svd", density=0.5), "does not"),
        (dict(how="svd", rank=0), "positive integer"),
        (dict(how="ties", density=0.5, majority_sign="mean"), "majority_sign must be one of"),
        (dict(how="ties", density=0.5, clamp=0.9), "clamp"),
        (dict(how="ties", density=0.5), r"one rank per path; 'transformer/h/0/attn/c_attn/kernel' has ranks"),
        (dict(how="svd", rank=17), r"SVD rank 17 exceeds the 16 x 48 delta of 'transformer/h/0/attn/c_attn"),
        (dict(how="average"), "unknown combination 'average'"),
    ]
    for kw, match in bad:
        with pytest.raises(ValueError, match=match):
            multi.combine(CONFIGS, bank, w, **kw)


# (combination, our kwargs, PEFT kwargs, adapters): PEFT's add_weighted_adapter on the same adapters
PEFT_COMBINATIONS = [
    ("cat", {}, {}, "ab"),
    ("svd", {}, {}, "ab"),
    ("svd", {"rank": 3}, {"svd_rank": 3}, "ab"),
    ("ties_svd", {"density": 0.5}, {"density": 0.5}, "ab"),
    ("magnitude_prune_svd", {"density": 0.3}, {"density": 0.3}, "ab"),
    ("ties", {"density": 0.5, "majority_sign": "frequency"}, {"density": 0.5, "majority_sign_method": "frequency"},
     "ac"),
    ("magnitude_prune", {"density": 0.4}, {"density": 0.4}, "ac"),
    ("dare_ties", {"density": 1.0, "key": jax.random.key(0)}, {"density": 1.0}, "ac"),  # 1: nothing dropped
]


def _peft_deltas(sd: dict[str, np.ndarray], scale: float) -> dict[str, np.ndarray]:
    """{module: scale * B @ A} of a PEFT state dict (torch orientation)."""
    mods = {k.rsplit(".lora_A", 1)[0] for k in sd if ".lora_A" in k}
    return {m: scale * sd[f"{m}.lora_B.weight"].astype(np.float64) @ sd[f"{m}.lora_A.weight"] for m in mods}


def test_combinations_match_peft_add_weighted_adapter(tmp_path, tiny_gpt2_dir):
    """Every combination PEFT offers but its `linear`, against PEFT on the same adapters: the same
    factors, or for the SVD ones the same delta (singular vectors are defined up to sign)."""
    pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from lora_jax import peft as lp
    from lora_jax.models import from_pretrained

    model, params = from_pretrained(tiny_gpt2_dir)
    shapes = jax.eval_shape(lambda: params)
    configs = {"a": CONFIGS["a"], "b": lj.LoraConfig(rank=2, alpha=4, targets=["c_attn", "c_fc"]),
               "c": lj.LoraConfig(rank=4, alpha=2, targets=["c_attn", "c_fc"])}
    bank = {n: jax.tree.map(lambda s: jnp.asarray(RNG.normal(0, 0.5, s.shape), s.dtype),
                            jax.eval_shape(lambda c=c: lj.init(c, shapes, jax.random.key(0))))
            for n, c in configs.items()}
    for n in configs:
        lp.save_peft(tmp_path / n, configs[n], bank[n], model_config=model.config, params=params)
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir, attn_implementation="eager")
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "a"), adapter_name="a")
    for n in "bc":
        pm.load_adapter(str(tmp_path / n), adapter_name=n)
    weights = {"a": 0.7, "b": -0.4, "c": 1.3}
    for i, (how, ours_kw, peft_kw, names) in enumerate(PEFT_COMBINATIONS):
        w = {n: weights[n] for n in names}
        with pytest.warns(UserWarning, match="density") if ours_kw.get("density") == 1.0 else contextlib.nullcontext():
            pm.add_weighted_adapter(list(w), list(w.values()), f"m{i}", combination_type=how, **peft_kw)
        config, combined = multi.combine(configs, bank, w, how=how, **ours_kw)
        ours = lp.peft_state_dict(config, combined)
        theirs = {k.replace(f".m{i}.", "."): v.detach().numpy() for k, v in pm.state_dict().items()
                  if f".m{i}." in k}
        assert sorted(ours) == sorted(theirs), how
        assert pm.peft_config[f"m{i}"].r == config.rank and config.alpha == config.rank, how
        if how.endswith("svd"):
            d_ours, d_theirs = _peft_deltas(ours, 1.0), _peft_deltas(theirs, 1.0)
            for m in d_ours:
                np.testing.assert_allclose(d_ours[m], d_theirs[m], atol=2e-5, err_msg=f"{how} {m}")
        else:
            for k in ours:
                np.testing.assert_allclose(ours[k], theirs[k], atol=1e-6, err_msg=f"{how} {k}")
    assert pm.peft_config["m0"].r == 6 and pm.peft_config["m1"].r == 4 and pm.peft_config["m2"].r == 3


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


def test_combine_names_the_adapter_whose_factors_do_not_fit():
    """Factors of another base, or an A and a B of different ranks, are refused naming the adapter and
    path (rank concatenation once summed A [8, 3] + [8, 1] with B [1, 6] + [3, 6] into a wrong delta)."""
    c = lj.LoraConfig(rank=2, targets=["x"])
    ab = lambda a, b: {"m/x/kernel": {"lora_A": jnp.ones(a), "lora_B": jnp.ones(b)}}  # noqa: E731
    good = ab((8, 2), (2, 6))
    for how, kw in [("linear", {}), ("svd", {}), ("ties", {"density": 0.5})]:
        with pytest.raises(ValueError, match=r"adapter 'b' at 'm/x/kernel': lora_A \(5, 2\)"):
            multi.combine({"a": c, "b": c}, {"a": good, "b": ab((5, 2), (2, 6))}, {"a": 1.0, "b": 1.0}, how=how, **kw)
    bank = {"a": good, "b": ab((8, 3), (1, 6)), "c": ab((8, 1), (3, 6))}
    with pytest.raises(ValueError, match=r"adapter 'b' at 'm/x/kernel': lora_A \(8, 3\) / lora_B \(1, 6\)"):
        multi.combine({n: c for n in bank}, bank, {n: 1.0 for n in bank}, how="cat")
