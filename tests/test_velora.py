"""VeLoRA (PEFT's velora_config): PEFT's gradients both ways, less memory for the backward, refusals."""

from __future__ import annotations

import dataclasses
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax import peft as lp
from lora_jax import velora
from lora_jax.models import from_pretrained

IDS = np.array([[5, 9, 17, 33, 2, 7], [40, 41, 42, 3, 3, 3]])
TARGETS = {"gpt2": ["c_attn", "c_fc"], "bloom": ["query_key_value", "dense_h_to_4h"]}


@pytest.mark.parametrize("name", ["gpt2", "bloom"])
def test_gradients_match_peft_both_ways(name, tiny_gpt2_dir, tiny_bloom_dir, tmp_path, nudge_torch, peft_grads):
    """lora_A's gradient is PEFT's VeLoRA one (5 groups of 32 or 48 features: padded sub-tokens,
    scale 1.5), not plain LoRA's; lora_B's and the outputs are plain LoRA's; the file goes both
    ways (PEFT trains ours with the same gradients)."""
    pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.config import VeloraConfig
    from transformers import AutoModelForCausalLM

    directory = {"gpt2": tiny_gpt2_dir, "bloom": tiny_bloom_dir}[name]
    hf = lambda: AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager")  # noqa: E731
    pm = nudge_torch(peft.get_peft_model(hf(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS[name], velora_config=VeloraConfig(num_groups=5, scale=1.5))), seed=3)
    pm.save_pretrained(tmp_path / "theirs")
    want = peft_grads(pm, IDS)

    model, params = from_pretrained(directory)
    got = lp.load_peft(tmp_path / "theirs", params)
    assert (got.config.velora_num_groups, got.config.velora_scale) == (5, 1.5)
    plain = dataclasses.replace(got.config, velora_num_groups=None)
    loss = lambda cfg: lambda a: (lj.apply(model.apply, cfg, strict=True)(params, a, IDS) ** 2).mean()  # noqa: E731
    grads = jax.grad(loss(got.config))(got.adapters)
    exact = jax.grad(loss(plain))(got.adapters)
    for p, ab in want.items():
        np.testing.assert_allclose(grads[p]["lora_A"], ab["lora_A"], atol=1e-6, rtol=1e-5)
        np.testing.assert_allclose(grads[p]["lora_B"], ab["lora_B"], atol=1e-6, rtol=1e-5)
        assert np.abs(np.asarray(exact[p]["lora_A"]) - ab["lora_A"]).max() > 1e-3  # an approximation
        np.testing.assert_allclose(exact[p]["lora_B"], ab["lora_B"], atol=1e-6, rtol=1e-5)
    np.testing.assert_array_equal(lj.apply(model.apply, got.config)(params, got.adapters, IDS),
                                  lj.apply(model.apply, plain)(params, got.adapters, IDS))

    out = lp.save_peft(tmp_path / "ours", got.config, got.adapters, model_config=model.config)
    assert json.loads((out / lp.CONFIG_FILE).read_text())["velora_config"] == {
        "num_groups": 5, "scale": 1.5, "init_type": "batch_average"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. PEFT's "missing adapter keys"
        warnings.filterwarnings("ignore", "fan_in_fan_out")
        back = peft.PeftModel.from_pretrained(hf(), str(out), is_trainable=True)
    for p, ab in peft_grads(back, IDS).items():
        np.testing.assert_allclose(ab["lora_A"], want[p]["lora_A"], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("init_type", ["random", "batch_average_once"])
def test_fixed_projection_matches_peft(init_type, tiny_gpt2_dir, tmp_path, nudge_torch, peft_grads):
    """PEFT's init_type "random" (a unit vector drawn at init) and "batch_average_once" (the first
    training batch's mean, which velora.init_once computes from that batch): the projection
    `lora_velora_embed` goes both ways through PEFT's files, lora_A's gradient is PEFT's with it
    (not batch_average's), and a summary counts it nowhere, as PEFT counts a buffer."""
    pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.config import VeloraConfig
    from transformers import AutoModelForCausalLM

    hf = lambda: AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir, attn_implementation="eager")  # noqa: E731
    pm = peft.get_peft_model(hf(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["gpt2"], velora_config=
                                                   VeloraConfig(num_groups=5, scale=1.5, init_type=init_type)))
    pm.save_pretrained(tmp_path / "start")
    first = np.array([[7, 3, 11, 19, 23, 5, 8, 2]])
    peft_grads(pm, first)  # PEFT's first training forward: batch_average_once takes its projection here
    pm = nudge_torch(pm, seed=3)
    pm.save_pretrained(tmp_path / "theirs")
    want = peft_grads(pm, IDS)
    theirs = {n.removeprefix("base_model.model.").removesuffix(".lora_velora_embed.default"): b.numpy()
              for n, b in pm.named_buffers() if "lora_velora_embed" in n}

    model, params = from_pretrained(tiny_gpt2_dir)
    start = lp.load_peft(tmp_path / "start", params)
    assert start.config.velora_init_type == init_type
    if init_type == "batch_average_once":  # PEFT saved it unset (zeros): set it from the first batch
        assert not any(np.asarray(ab[velora.EMBED]).any() for ab in start.adapters.values())
        set_once = velora.init_once(start.config, params, model.apply, first, start.adapters)
    got = lp.load_peft(tmp_path / "theirs", params)
    assert got.config == start.config
    for p, ab in got.adapters.items():
        v = theirs[p.removesuffix("/kernel").replace("/", ".")]
        np.testing.assert_array_equal(ab[velora.EMBED], v)
        assert abs(np.linalg.norm(v) - 1) < 1e-5
        if init_type == "batch_average_once":
            np.testing.assert_allclose(set_once[p][velora.EMBED], v, atol=1e-5)
    per_batch = dataclasses.replace(got.config, velora_init_type="batch_average")
    loss = lambda cfg: lambda a: (lj.apply(model.apply, cfg, strict=True)(params, a, IDS) ** 2).mean()  # noqa: E731
    grads = jax.grad(loss(got.config))(got.adapters)
    other = jax.grad(loss(per_batch))({p: {k: v for k, v in ab.items() if k != velora.EMBED}
                                       for p, ab in got.adapters.items()})
    for p, ab in want.items():
        np.testing.assert_allclose(grads[p]["lora_A"], ab["lora_A"], atol=1e-6, rtol=1e-5)
        np.testing.assert_allclose(grads[p]["lora_B"], ab["lora_B"], atol=1e-6, rtol=1e-5)
        assert np.abs(np.asarray(other[p]["lora_A"]) - ab["lora_A"]).max() > 1e-4  # the projection matters
        assert not np.asarray(grads[p][velora.EMBED]).any()
    plain = dataclasses.replace(got.config, velora_num_groups=None, velora_init_type="batch_average")
    bare = {p: {k: v for k, v in ab.items() if k != velora.EMBED} for p, ab in got.adapters.items()}
    assert lj.summary(got.config, params, got.adapters) == lj.summary(plain, params, bare)

    out = lp.save_peft(tmp_path / "ours", got.config, got.adapters, model_config=model.config)
    assert json.loads((out / lp.CONFIG_FILE).read_text())["velora_config"]["init_type"] == init_type
    back = peft.PeftModel.from_pretrained(hf(), str(out), is_trainable=True)
    for n, b in back.named_buffers():
        if "lora_velora_embed" in n:
            np.testing.assert_array_equal(b.numpy(), theirs[n.removeprefix("base_model.model.").removesuffix(
                ".lora_velora_embed.default")])
    if init_type == "random":  # (PEFT re-takes a loaded batch_average_once projection from its next batch)
        for p, ab in peft_grads(back, IDS).items():
            np.testing.assert_allclose(ab["lora_A"], want[p]["lora_A"], atol=1e-6, rtol=1e-5)


def test_backward_keeps_less_and_runs_scanned(tiny_gpt2_dir):
    """What autodiff keeps for the backward pass (the residuals of jax.vjp) loses each
    adapted matrix's [N, in] input, for [N, groups] numbers; scanned layers give the unrolled
    gradients."""
    model, params = from_pretrained(tiny_gpt2_dir)
    config = lj.LoraConfig(rank=4, alpha=8, targets=["c_attn", "c_fc", "mlp/c_proj"])
    velora = dataclasses.replace(config, velora_num_groups=4)
    adapters = jax.tree.map(lambda x: x + 0.01, lj.init(config, params, jax.random.key(0)))
    ids = jnp.ones((8, 64), jnp.int32)

    def kept(cfg):  # bytes of the residuals jax.vjp's backward function holds (shapes only, nothing run)
        f = lambda a: lj.apply(model.apply, cfg)(params, a, ids).astype(jnp.float32).std()  # noqa: E731
        residuals = jax.eval_shape(lambda a: jax.tree.leaves(jax.vjp(f, a)[1]), adapters)
        return sum(x.size * x.dtype.itemsize for x in residuals)
    n = ids.size  # tokens; per layer the inputs of c_attn [n, 32], c_fc [n, 32] and c_proj [n, 128] in fp32
    inputs = 2 * n * (32 + 32 + 128) * 4
    compressed = 2 * n * 3 * 4 * 4  # [n, 4] per matrix
    assert kept(config) - kept(velora) >= 0.99 * (inputs - compressed)  # (less the projections and such: < 1 kB)

    scanned_model, scanned = from_pretrained(tiny_gpt2_dir, scan_layers=True)
    stacked = {p.replace("h/0/", "h/"): {k: jnp.stack([v, adapters[p.replace("h/0/", "h/1/")][k]])
                                         for k, v in ab.items()} for p, ab in adapters.items() if "/h/0/" in p}
    grad = lambda m, pr, a: jax.grad(lambda a: (lj.apply(m.apply, velora)(pr, a, IDS) ** 2).mean())(a)  # noqa: E731
    unrolled, scan = grad(model, params, adapters), grad(scanned_model, scanned, stacked)
    for p, ab in scan.items():
        for i in (0, 1):
            np.testing.assert_allclose(ab["lora_A"][i], unrolled[p.replace("h/", f"h/{i}/")]["lora_A"],
                                       atol=1e-6, rtol=1e-5)


def test_refusals(tiny_gpt2_dir, tmp_path):
    model, params = from_pretrained(tiny_gpt2_dir)
    with pytest.raises(ValueError, match="VeLoRA.*not with use_dora"):
        lj.LoraConfig(velora_num_groups=4, use_dora=True)
    with pytest.raises(ValueError, match="velora_num_groups must be a positive integer, got 0"):
        lj.LoraConfig(velora_num_groups=0)
    with pytest.raises(ValueError, match="velora_scale must be a positive number"):
        lj.LoraConfig(velora_num_groups=4, velora_scale=-1.0)
    with pytest.raises(ValueError, match="VeLoRA .* adapts linear layers; 'transformer/wte/embedding'"):
        lj.target_paths(lj.LoraConfig(targets=["wte"], velora_num_groups=4), params)
    config = lj.LoraConfig(rank=2, targets=["c_attn"], velora_num_groups=4)
    adapters = lj.init(config, params, jax.random.key(0))
    w = params["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"]
    used_transposed = lambda p, x: x @ p["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"].T  # noqa: E731
    with pytest.raises(ValueError, match="VeLoRA compresses the input of x @ A.*used transposed"):
        lj.apply(used_transposed, config)(params, adapters, jnp.ones((2, w.shape[1])))
    out = lp.save_peft(tmp_path / "peft", config, adapters, model_config=model.config)
    cfg = json.loads((out / lp.CONFIG_FILE).read_text())
    cfg["velora_config"]["init_type"] = "sketch"
    (out / lp.CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="init_type='sketch' is none of PEFT's"):
        lp.load_peft(out, params)
    with pytest.raises(ValueError, match="velora_init_type='random' is VeLoRA's: set velora_num_groups too"):
        lj.LoraConfig(velora_init_type="random")
    fixed = lj.LoraConfig(rank=2, targets=["c_attn"], velora_num_groups=4, velora_init_type="random")
    with pytest.raises(ValueError, match=r"init_once sets VeLoRA's batch_average_once projection"):
        velora.init_once(fixed, params, model.apply, IDS, lj.init(fixed, params, jax.random.key(0)))
    bad = {p: {**ab, velora.EMBED: ab[velora.EMBED][:3]} for p, ab in lj.init(fixed, params, jax.random.key(0)).items()}
    with pytest.raises(ValueError, match=r"lora_velora_embed \(3,\); VeLoRA's 4 groups of its 32 inputs need \(8,\)"):
        lj.check_adapters(fixed, params, bad)
