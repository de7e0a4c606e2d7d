"""layers_to_transform / layers_pattern (PEFT's layer selection) on unrolled and scanned layers."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

import lora_jax as lj
from lora_jax import peft as lp
from lora_jax import quant
from lora_jax.models import from_pretrained

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

IDS = np.array([[5, 17, 42, 99, 3, 250, 7, 12], [1, 2, 3, 4, 5, 6, 7, 300]], np.int32)
TARGETS = ["c_attn", "c_fc"]


def hf_model(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()


@pytest.mark.parametrize("layers,pattern", [([1], "h"), (0, None)])
def test_selects_the_modules_peft_selects(layers, pattern, tiny_gpt2_dir):
    _, params = from_pretrained(tiny_gpt2_dir)
    config = lj.LoraConfig(rank=2, alpha=4, targets=TARGETS, layers_to_transform=layers, layers_pattern=pattern)
    ours = {p.rsplit("/", 1)[0].replace("/", ".") for p in lj.init(config, params, jax.random.key(0))}
    pm = peft.get_peft_model(hf_model(tiny_gpt2_dir), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=TARGETS, layers_to_transform=layers, layers_pattern=pattern))
    theirs = {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if hasattr(m, "lora_A")}
    assert ours == theirs and len(ours) == 2


def _train(model, params, config, steps=3):
    """Real AdamW steps (weight decay included) on a next-token loss."""
    g = lj.apply(model.apply, config)

    def loss_fn(params, adapters, ids):
        return optax.softmax_cross_entropy_with_integer_labels(g(params, adapters, ids)[:, :-1], ids[:, 1:]).mean()

    ts = lj.make_train_step(loss_fn, optax.adamw(1e-2, weight_decay=0.1))
    trainable, frozen = lj.split(config, params, lj.init(config, params, jax.random.key(0)))
    opt, step = ts.init(trainable), jax.jit(ts.step)
    for _ in range(steps):
        trainable, opt, _ = step(trainable, frozen, opt, IDS)
    return lj.join(trainable, frozen)[1]


def test_scanned_layers_left_out_stay_zero_and_export_as_peft_does(tiny_gpt2_dir, tmp_path):
    """On a scanned base the stack's other layers hold zero factors through training; the summary
    counts what an unrolled base trains, and the PEFT export holds layer 1 alone, as PEFT's own
    save of the same config does, and loads in PEFT with our logits."""
    config = lj.LoraConfig(rank=2, alpha=4, targets=TARGETS, layers_to_transform=[1], layers_pattern="h")
    model, params = from_pretrained(tiny_gpt2_dir, scan_layers=True)
    adapters = _train(model, params, config)
    assert sorted(adapters) == ["transformer/h/attn/c_attn/kernel", "transformer/h/mlp/c_fc/kernel"]
    for p, ab in adapters.items():
        assert not np.any(ab["lora_A"][0]) and not np.any(ab["lora_B"][0]), p
        assert np.all(np.abs(ab["lora_B"][1]).max(axis=-1) > 0), p
    model1, unrolled = from_pretrained(tiny_gpt2_dir)
    one_layer = (32 * 2 + 2 * 96) + (32 * 2 + 2 * 128)  # c_attn 32 -> 96, c_fc 32 -> 128 at rank 2
    assert lj.summary(config, params, adapters).trainable == one_layer == \
        lj.summary(config, unrolled, lj.init(config, unrolled, jax.random.key(0))).trainable

    out = lp.save_peft(tmp_path / "peft", config, adapters, model_config=model.config)
    cfg = json.loads((out / lp.CONFIG_FILE).read_text())
    assert (cfg["target_modules"], cfg["layers_to_transform"], cfg["layers_pattern"]) == (TARGETS, [1], ["h"])
    pm = peft.get_peft_model(hf_model(tiny_gpt2_dir), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=TARGETS, layers_to_transform=[1], layers_pattern="h"))
    pm.save_pretrained(tmp_path / "theirs")
    assert set(load_file(out / lp.WEIGHTS_FILE)) == set(load_file(tmp_path / "theirs" / lp.WEIGHTS_FILE))

    want = np.asarray(lj.apply(model.apply, config)(params, adapters, IDS))
    with torch.no_grad():
        got = peft.PeftModel.from_pretrained(hf_model(tiny_gpt2_dir), str(out)).eval()(
            torch.tensor(IDS, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    back = lp.load_peft(out, unrolled)
    assert back.config.layers_to_transform == (1,) and back.config.layers_pattern == ("h",)
    assert sorted(back.adapters) == ["transformer/h/1/attn/c_attn/kernel", "transformer/h/1/mlp/c_fc/kernel"]
    np.testing.assert_allclose(lj.apply(model1.apply, back.config)(unrolled, back.adapters, IDS), want, atol=1e-4)


def test_inits_that_read_the_weights_leave_the_other_layers_alone(tiny_gpt2_dir):
    """PiSSA keeps W0 in the layers left out, LoftQ quantizes them plainly, EVA gives them no rank;
    in the layer kept PiSSA and EVA equal their unrolled results and LoftQ moves the codes."""
    model, params = from_pretrained(tiny_gpt2_dir, scan_layers=True)
    model1, unrolled = from_pretrained(tiny_gpt2_dir)
    flat = lj.tree.flatten(params)
    kw = dict(rank=2, alpha=4, targets=TARGETS, layers_to_transform=[1])
    stack, one = "transformer/h/attn/c_attn/kernel", "transformer/h/1/attn/c_attn/kernel"

    pissa = lj.LoraConfig(**kw, init="pissa")
    res, a0 = lj.init_residual(pissa, params, jax.random.key(0))
    res1, _ = lj.init_residual(pissa, unrolled, jax.random.key(0))
    res, res1 = lj.tree.flatten(res), lj.tree.flatten(res1)
    np.testing.assert_array_equal(res[stack][0], flat[stack][0])
    np.testing.assert_allclose(res[stack][1], res1[one], atol=1e-5)
    assert not np.any(a0[stack]["lora_A"][0]) and not np.any(a0[stack]["lora_B"][0])

    qparams, _ = lj.init_loftq(lj.LoraConfig(**kw), params, iters=2)
    plain = quant.quantize({"k": {"kernel": flat[stack]}})["k"]["kernel"]
    q = lj.tree.flatten(qparams)[stack]
    np.testing.assert_array_equal(q.codes[0], plain.codes[0])
    assert np.any(q.codes[1] != plain.codes[1])

    calib = [{"ids": jnp.asarray(IDS)}] * 2
    _, eva = lj.init_eva(lj.LoraConfig(**kw), params, lambda p, b: model.apply(p, b["ids"]), calib,
                         eva=lj.EvaConfig(rho=2.0))
    _, eva1 = lj.init_eva(lj.LoraConfig(**kw), unrolled, lambda p, b: model1.apply(p, b["ids"]), calib,
                          eva=lj.EvaConfig(rho=2.0))
    for p in eva:
        assert not np.any(eva[p]["lora_A"][0]), p
        q1 = p.replace("transformer/h/", "transformer/h/1/")
        k = eva1[q1]["lora_A"].shape[-1]
        np.testing.assert_allclose(np.abs(eva[p]["lora_A"][1][:, :k]), np.abs(eva1[q1]["lora_A"]), atol=1e-4)
        assert not np.any(eva[p]["lora_A"][1][:, k:])
    assert sum(ab["lora_A"].shape[-1] for ab in eva1.values()) == 2 * 2  # the budget: the kept matrices' ranks


def test_layer_numbers_patterns_and_refusals():
    """Flax linen's `blocks_<i>` names need layers_pattern; bad values, regex targets, and what a
    partly adapted stack would train in every layer are refused by name."""
    w = jax.ShapeDtypeStruct((8, 8), jnp.float32)
    params = {"blocks_0": {"dense": {"kernel": w}}, "blocks_1": {"dense": {"kernel": w}}, "head": {"kernel": w}}
    config = lj.LoraConfig(rank=2, targets=["dense", "head"], layers_to_transform=1, layers_pattern="blocks")
    assert lj.target_paths(config, params) == ["blocks_1/dense/kernel"]
    with pytest.raises(ValueError, match=r"layers_to_transform=\[1\] \(layers_pattern=None\) keeps none of the 3 "
                                         r"targeted weights.*layer numbers in their paths: none"):
        lj.target_paths(lj.LoraConfig(rank=2, targets=["dense", "head"], layers_to_transform=[1]), params)
    assert lj.LoraConfig.from_json(config.to_json()) == config
    for kw, msg in [(dict(layers_pattern="h"), "layers_pattern needs layers_to_transform"),
                    (dict(layers_to_transform=[-1]), "must be a layer index or a non-empty list"),
                    (dict(layers_to_transform=[0], targets=".*dense"), "with a regex target '.*dense'"),
                    (dict(layers_to_transform=[0], layers_pattern=[""]), "layers_pattern must be a name")]:
        with pytest.raises(ValueError, match=msg):
            lj.LoraConfig(**kw)

    stack = {"model": {"layers": {"mlp": {"kernel": jnp.ones((3, 8, 8)), "bias": jnp.zeros((3, 8))}}}}
    kw = dict(rank=2, targets=["mlp"], layers_to_transform=[0, 2], layers_pattern="layers")
    adapters = lj.init(lj.LoraConfig(**kw), stack, jax.random.key(0))
    assert [bool(np.any(a)) for a in adapters["model/layers/mlp/kernel"]["lora_A"]] == [True, False, True]
    for extra, what in [(dict(use_dora=True), "its DoRA magnitude"), (dict(lora_bias=True), "lora_B's bias"),
                        (dict(bias="lora_only"), "its bias")]:
        with pytest.raises(ValueError, match=rf"adapts layers \[0, 2\] of the stack 'model/layers/mlp/kernel' "
                                             rf"\(3, 8, 8\); {what}.*would train in every layer"):
            lj.init(lj.LoraConfig(**kw, **extra), stack, jax.random.key(0))
    full = lj.LoraConfig(**{**kw, "layers_to_transform": [0, 1, 2]}, use_dora=True)  # every layer: nothing left out
    assert lj.init(full, stack, jax.random.key(0))["model/layers/mlp/kernel"]["lora_A"].shape == (3, 8, 2)


def test_no_backward_pass_below_the_lowest_adapted_layer():
    """Frozen weights get no gradient, so a step adapting the top layer alone stops its backward
    pass there: fewer compiled FLOPs than adapting the bottom layer alone, which backpropagates
    through every layer."""
    from lora_jax.models import CausalLM, GPT2Config

    model = CausalLM(GPT2Config(vocab_size=256, hidden_size=64, num_layers=4, num_heads=4, intermediate_size=256,
                                max_position_embeddings=64))
    params = model.init_params(jax.random.key(0))
    ids = jnp.ones((2, 64), jnp.int32)

    def flops(layer):
        config = lj.LoraConfig(rank=8, targets=["c_attn", "c_fc"], layers_to_transform=[layer])
        g = lj.apply(model.apply, config)
        ts = lj.make_train_step(lambda p, a, x: optax.softmax_cross_entropy_with_integer_labels(
            g(p, a, x)[:, :-1], x[:, 1:]).mean(), optax.adamw(1e-3))
        trainable, frozen = lj.split(config, params, lj.init(config, params, jax.random.key(1)))
        cost = jax.jit(ts.step).lower(trainable, frozen, ts.init(trainable), ids).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    top, bottom = flops(3), flops(0)
    assert top < 0.75 * bottom, (top, bottom)
