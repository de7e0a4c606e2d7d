"""EVA init (PEFT `init_lora_weights="eva"`): A = the principal directions of each layer's masked
inputs, ranks redistributed by explained variance; checked against an SVD of the inputs."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax import eva
from lora_jax import peft as lp
from lora_jax.models import from_pretrained

RNG = np.random.default_rng(0)
D = 8
BASIS = np.linalg.qr(RNG.normal(size=(D, D)))[0]
PARAMS = {"one": {"kernel": jnp.asarray(RNG.normal(size=(D, 6)), jnp.float32)},
          "two": {"kernel": jnp.asarray(RNG.normal(size=(D, 6)), jnp.float32)}}


def two_inputs(p, batch):
    return batch["x1"] @ p["one"]["kernel"] + batch["x2"] @ p["two"]["kernel"]


def make_batch(n: int = 40) -> dict[str, jnp.ndarray]:
    # x1: four strong directions (and an offset, which PCA centres away); x2: isotropic.
    x1 = RNG.normal(size=(2, n, D)) * np.array([10, 9, 8, 7, .1, .1, .1, .1]) @ BASIS.T + 3.0
    mask = RNG.random((2, n)) > 0.3
    garbage = np.where(mask[..., None], 0.0, 100 * RNG.normal(size=(2, n, D)))  # masked rows must not count
    return {"x1": jnp.asarray(x1 + garbage, jnp.float32), "x2": jnp.asarray(RNG.normal(size=(2, n, D)), jnp.float32),
            "mask": jnp.asarray(mask)}


BATCHES = [make_batch() for _ in range(3)]


def pca(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Right singular vectors [k, in] and singular values of the centred rows, by SVD."""
    _, s, vt = np.linalg.svd(rows - rows.mean(0), full_matrices=False)
    return vt, s


def same_directions(a: np.ndarray, vt: np.ndarray) -> None:
    """a [in, k] spans, column by column, the first k directions of vt (up to sign)."""
    k = a.shape[1]
    np.testing.assert_allclose(np.abs(np.sum(a.T * vt[:k], axis=1)), np.ones(k), atol=1e-6)


def test_eva_takes_ranks_where_the_variance_is():
    config = lj.LoraConfig(rank=2, alpha=4.0, targets=["one", "two"], bias="lora_only")
    new, adapters = lj.init_eva(config, PARAMS, two_inputs, BATCHES, mask=lambda b: b["mask"])
    # Budget 2 + 2; x1's four strong directions outrank all of isotropic x2's: one takes 4, two none.
    assert sorted(adapters) == ["one/kernel"] and adapters["one/kernel"]["lora_A"].shape == (D, 4)
    assert new.init == "eva" and new.rank_for("one/kernel") == 4 and new.scale_for("one/kernel") == 2.0
    assert lj.target_paths(new, PARAMS) == ["one/kernel"]  # `two` left out, its bias no longer trains
    assert not lj.trainable_mask(new, {**PARAMS, "two": {**PARAMS["two"], "bias": jnp.zeros(6)}})["two"]["bias"]
    rows = np.concatenate([np.asarray(b["x1"])[np.asarray(b["mask"])] for b in BATCHES])
    vt, s = pca(rows)
    same_directions(np.asarray(adapters["one/kernel"]["lora_A"]), vt)
    assert not np.any(np.asarray(adapters["one/kernel"]["lora_B"]))
    g = lj.apply(two_inputs, new, strict=True)  # starts as the base model
    np.testing.assert_allclose(g(PARAMS, adapters, BATCHES[0]), two_inputs(PARAMS, BATCHES[0]), atol=1e-5)

    # rho=1: no redistribution; whiten divides by sqrt(singular value); alpha stays with the rank
    # when adjust_scaling_factors is off.
    new, adapters = lj.init_eva(dataclasses.replace(config, alpha_pattern={"t.o": 6.0}), PARAMS, two_inputs,
                                BATCHES, mask=lambda b: b["mask"], eva=eva.EvaConfig(rho=1.0, whiten=True))
    assert {p: ab["lora_A"].shape[1] for p, ab in adapters.items()} == {"one/kernel": 2, "two/kernel": 2}
    a = np.asarray(adapters["one/kernel"]["lora_A"])
    same_directions(a * np.sqrt(s[:2]), vt)
    new, _ = lj.init_eva(config, PARAMS, two_inputs, BATCHES, mask=lambda b: b["mask"],
                         eva=eva.EvaConfig(adjust_scaling_factors=False))
    assert new.rank_for("one/kernel") == 4 and new.scale_for("one/kernel") == 1.0


def test_eva_reads_gpt2_layer_inputs(tiny_gpt2_dir, tmp_path):
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 200, (4, 12)), jnp.int32)
    mask = jnp.asarray(np.arange(12)[None, :] < np.array([[12], [9], [5], [12]]), jnp.int32)
    batches = [{"ids": ids, "mask": mask}, {"ids": ids[::-1], "mask": mask[::-1]}]
    config = lj.LoraConfig(rank=2, alpha=4.0, targets=["c_attn", "c_fc", "c_proj"])
    ranks = {}
    for scan in (False, True):
        model, params = from_pretrained(tiny_gpt2_dir, scan_layers=scan)
        new, adapters = lj.init_eva(config, params, lambda p, b: model.apply(p, b["ids"], b["mask"]), batches,
                                    mask=lambda b: b["mask"], eva=lj.EvaConfig(rho=4.0))
        flat = lj.tree.flatten(params)

        def layer(path, i):  # a stacked leaf holds every layer, zero columns past the layer's rank
            a = np.asarray(adapters[path]["lora_A"])
            a = a[i] if scan else a
            return a[:, np.any(a != 0, axis=0)]

        # Layer 0's c_attn sees ln_1(wte[ids] + wpe[pos]) at the unmasked positions.
        x = np.asarray(flat["transformer/wte/embedding"])[np.asarray(ids)] + np.asarray(
            flat["transformer/wpe/embedding"])[:12]
        ln = "transformer/h/ln_1" if scan else "transformer/h/0/ln_1"
        scale, bias = (np.asarray(flat[f"{ln}/{k}"]) for k in ("scale", "bias"))
        scale, bias = (scale[0], bias[0]) if scan else (scale, bias)
        y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + model.config.layer_norm_epsilon)
        rows = (y * scale + bias)[np.asarray(mask, bool)]
        c_attn = "transformer/h/attn/c_attn/kernel" if scan else "transformer/h/0/attn/c_attn/kernel"
        same_directions(layer(c_attn, 0), pca(np.concatenate([rows, rows]))[0])

        n = model.config.num_layers
        ranks[scan] = {(p.replace(f"/{i}/", "/"), i): layer(p, i).shape[1] for p in adapters for i in range(n)
                       if scan or f"/{i}/" in p}
        for p in adapters:  # every matrix keeps alpha / r = 2 (adjust_scaling_factors)
            assert new.scale_for(p) == 2.0
            lj.check_adapters(new, params, adapters)
        if not scan:  # the result goes out to PEFT with its ranks and comes back the same
            loaded = lp.load_peft(lp.save_peft(tmp_path / "eva", new, adapters, model_config=model.config), params)
            for p, ab in adapters.items():
                assert loaded.config.rank_for(p) == ab["lora_A"].shape[1] and loaded.config.scale_for(p) == 2.0
                np.testing.assert_array_equal(loaded.adapters[p]["lora_A"], ab["lora_A"])
    # QLoRA: on (stacked) NF4 weights EVA reads the 4-bit model's layer inputs, those of its dequantized weights.
    q = lj.quant.quantize(params)
    _, on_nf4 = lj.init_eva(config, q, lambda p, b: model.apply(p, b["ids"], b["mask"]), batches,
                            mask=lambda b: b["mask"], eva=lj.EvaConfig(rho=4.0))
    _, on_deq = lj.init_eva(config, lj.quant.dequantize(q), lambda p, b: model.apply(p, b["ids"], b["mask"]),
                            batches, mask=lambda b: b["mask"], eva=lj.EvaConfig(rho=4.0))
    assert sorted(on_nf4) == sorted(on_deq) == sorted(adapters)
    for p, ab in on_nf4.items():
        np.testing.assert_allclose(ab["lora_A"], on_deq[p]["lora_A"], atol=1e-5)
    # The budget 2 per matrix, redistributed unevenly, the same way for both layouts.
    assert ranks[True] == ranks[False] and sum(ranks[True].values()) == 2 * len(ranks[True])
    assert len(set(ranks[True].values())) > 1


def test_eva_refuses_what_it_cannot_do(tiny_gpt2_dir):
    config = lj.LoraConfig(rank=2, alpha=4.0, targets=["one", "two"])
    with pytest.raises(ValueError, match="fewer than the 4 directions"):
        lj.init_eva(config, PARAMS, two_inputs, [make_batch(1)], mask=lambda b: b["mask"])
    with pytest.raises(ValueError, match=r"token mask \(2, 3\) does not fit the \(2, 40\) input rows of 'one/kernel'"):
        lj.init_eva(config, PARAMS, two_inputs, BATCHES[:1], mask=lambda b: jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="empty"):
        lj.init_eva(config, PARAMS, two_inputs, [])
    with pytest.raises(ValueError, match=r"is computed on data: use lora_jax.init_eva\(config, params, f, batches\)"):
        lj.init(dataclasses.replace(config, init="eva"), PARAMS, jax.random.key(0))
    with pytest.raises(ValueError, match="EvaConfig.rho"):
        eva.EvaConfig(rho=0.5)
    # A stack holds one scale: rsLoRA with per-layer ranks cannot be represented.
    with pytest.raises(ValueError, match=r"ranks \[1, 3\].*use_rslora=True"):
        eva._check_stack(dataclasses.replace(config, use_rslora=True), "h/attn/kernel", [1, 3], eva.EvaConfig())
    with pytest.raises(ValueError, match="DoRA magnitude"):
        eva._check_stack(dataclasses.replace(config, use_dora=True), "h/attn/kernel", [0, 4], eva.EvaConfig())
    eva._check_stack(config, "h/attn/kernel", [0, 1, 3], eva.EvaConfig())  # zero-padded exactly

    # An embedding is looked up, not multiplied: PEFT's kaiming init for it, with a warning.
    model, params = from_pretrained(tiny_gpt2_dir)
    config = lj.LoraConfig(rank=2, alpha=4.0, targets=["c_proj", "wte"])
    batch = {"ids": jnp.ones((2, 6), jnp.int32)}
    f = lambda p, b: model.apply(p, b["ids"])  # noqa: E731
    with pytest.raises(ValueError, match="pass key="):
        lj.init_eva(config, params, f, [batch])
    with pytest.warns(UserWarning, match=r"1 target\(s\), \['transformer/wte/embedding'\]"):
        new, adapters = lj.init_eva(config, params, f, [batch] * 4, key=jax.random.key(0))
    assert adapters["transformer/wte/embedding"]["lora_A"].shape[-1] == 2
    lj.check_adapters(new, params, adapters)


def test_eva_agrees_with_peft():
    """PEFT's EVA (incremental PCA until the directions settle) on the same layers and data: the
    same ranks, the same directions."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.eva import get_eva_state_dict

    class TwoInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.one, self.two = torch.nn.Linear(D, 6, bias=False), torch.nn.Linear(D, 6, bias=False)

        def forward(self, x1, x2):
            return self.one(x1) + self.two(x2)

    rng = np.random.default_rng(5)
    spectrum = {"x1": np.array([100, 30, 9, 3, .1, .1, .1, .1]), "x2": np.array([50, 2, .5, .1, .1, .1, .1, .1])}
    batches = [{k: jnp.asarray(rng.normal(size=(2, 60, D)) * np.sqrt(v) @ BASIS.T + 3.0, jnp.float32)
                for k, v in spectrum.items()} for _ in range(4)]
    loader = [{k: torch.from_numpy(np.array(v)) for k, v in b.items()} for b in batches]
    peft_config = peft.LoraConfig(r=2, target_modules=["one", "two"], init_lora_weights="eva",
                                  eva_config=peft.EvaConfig(rho=2.0))
    theirs = get_eva_state_dict(TwoInputs(), loader, peft_config, forward_fn=lambda m, b: m(**b),
                                prepare_model_inputs_fn=None, prepare_layer_inputs_fn=None, show_progress_bar=False)
    _, adapters = lj.init_eva(lj.LoraConfig(rank=2, targets=["one", "two"]), PARAMS, two_inputs, batches)
    # Budget 4 by explained-variance ratio: x2's first (.94), then x1's first three (.70, .21, .06).
    assert {k: tuple(v.shape) for k, v in theirs.items()} == {"one": (3, D), "two": (1, D)}
    for name in ("one", "two"):
        a = np.asarray(adapters[f"{name}/kernel"]["lora_A"])  # [in, k]; PEFT's lora_A is [k, in]
        assert a.shape[1] == theirs[name].shape[0]
        cos = np.abs(np.sum(a.T * theirs[name].numpy(), axis=1))
        assert np.all(cos > 0.999), (name, cos)  # PEFT stops its PCA once successive steps agree to 0.99


def test_eva_ranks_two_targets_of_one_module_apart():
    """Two adapted parameters of one module (target_parameters) get EVA ranks of their own: the
    rank_pattern / alpha_pattern entries name each parameter, not their shared module."""
    rng = np.random.default_rng(5)
    spectrum = {"x1": np.array([100, 30, 9, 3, .1, .1, .1, .1]), "x2": np.array([50, 2, .5, .1, .1, .1, .1, .1])}
    batches = [{k: jnp.asarray(rng.normal(size=(2, 60, D)) * np.sqrt(v) @ BASIS.T, jnp.float32)
                for k, v in spectrum.items()} for _ in range(2)]
    params = {"mlp": {"w_one": PARAMS["one"]["kernel"], "w_two": PARAMS["two"]["kernel"]}}
    f = lambda p, b: b["x1"] @ p["mlp"]["w_one"] + b["x2"] @ p["mlp"]["w_two"]  # noqa: E731
    config = lj.LoraConfig(rank=2, alpha=4.0, target_parameters=["mlp/w_one", "mlp/w_two"])
    for adjust, scales in ((True, (2.0, 2.0)), (False, (4.0 / 3, 4.0))):
        new, adapters = lj.init_eva(config, params, f, batches, eva=lj.EvaConfig(adjust_scaling_factors=adjust))
        for p, r, s in (("mlp/w_one", 3, scales[0]), ("mlp/w_two", 1, scales[1])):
            assert adapters[p]["lora_A"].shape == (D, r) and new.rank_for(p) == r
            assert new.scale_for(p) == pytest.approx(s)
