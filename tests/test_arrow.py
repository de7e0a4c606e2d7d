"""Arrow routing (PEFT's create_arrow_model / ArrowConfig) with and without GenKnowSub: PEFT's
logits and prototypes, per-token routing through KV-cache generation, refusals."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax import arrow, multi
from lora_jax.models import from_pretrained, generate

IDS = np.array([[5, 9, 17, 33, 2, 7], [40, 41, 42, 3, 3, 3]])
TASKS, GENERAL = ("t0", "t1", "t2"), ("g0", "g1")


@pytest.fixture(scope="module")
def library(tiny_gpt2_dir, tmp_path_factory):
    """Five PEFT adapters on c_attn and c_fc (r=4, alphas 8 to 24), nonzero; in each task adapter
    one row of lora_A is 4x larger, so every delta has a clear top singular direction (PEFT finds
    it by 15 power iterations, which then agree with the exact vector lora_jax computes)."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("arrow")
    for i, name in enumerate(TASKS + GENERAL):
        hf = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir, attn_implementation="eager")
        pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8 + 4 * i, target_modules=["c_attn", "c_fc"]))
        torch.manual_seed(10 + i)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
                    if name in TASKS and "lora_A" in n:
                        p[i].mul_(4.0)
        pm.save_pretrained(root / name)
    return {name: root / name for name in TASKS + GENERAL}


def _router(bank, gks: bool):
    task = ({n: bank.configs[n] for n in TASKS}, {n: bank.adapters[n] for n in TASKS})
    general = ({n: bank.configs[n] for n in GENERAL}, {n: bank.adapters[n] for n in GENERAL}) if gks else ()
    return arrow.arrow_router(*task, *general)


@pytest.mark.parametrize("gks", [False, True])
def test_matches_peft(gks, library, tiny_gpt2_dir):
    """PEFT's Arrow model (top 2 of 3 experts, temperature 0.5; GenKnowSub over 2 general
    adapters) gives our logits, unrolled and scanned (with GenKnowSub also rematerialised: the
    routed factors enter each layer's checkpoint), and our prototypes up to sign."""
    torch = pytest.importorskip("torch")
    from peft import ArrowConfig, create_arrow_model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir, attn_implementation="eager")
    pm = create_arrow_model(hf, [str(library[n]) for n in TASKS],
                            ArrowConfig(top_k=2, router_temperature=0.5, use_gks=gks, rng_seed=0),
                            general_adapter_paths=[str(library[n]) for n in GENERAL] if gks else None).eval()
    with torch.no_grad():
        want = pm(torch.tensor(IDS)).logits.numpy()
    layer = pm.base_model.model.transformer.h[1]
    protos = {"attn/c_attn": layer.attn.c_attn.lora_arrow["arrow_router"].prototypes.numpy(),
              "mlp/c_fc": layer.mlp.c_fc.lora_arrow["arrow_router"].prototypes.numpy()}  # [E, in]
    for scan in (False, True):
        model, params = from_pretrained(tiny_gpt2_dir, scan_layers=scan, remat=scan and gks)
        router = arrow.load_router([library[n] for n in TASKS], params,
                                   general=[library[n] for n in GENERAL] if gks else ())
        if gks and scan:  # the same as the router from a bank loaded by hand
            same = _router(multi.load_bank(library, params), gks)
            jax.tree.map(np.testing.assert_array_equal, router, same)
        g = jax.jit(arrow.apply_arrow(model.apply, arrow.ArrowConfig(top_k=2, router_temperature=0.5)))
        np.testing.assert_allclose(g(params, router, IDS), want, atol=5e-5)
        assert np.abs(np.asarray(model.apply(params, IDS)) - want).max() > 0.1  # the adapters act
        for module, theirs in protos.items():
            ours = router[f"transformer/h/{module}/kernel" if scan else f"transformer/h/1/{module}/kernel"]
            ours = np.asarray(ours[arrow.PROTOTYPES][1] if scan else ours[arrow.PROTOTYPES])
            np.testing.assert_allclose(np.abs((ours * theirs).sum(-1)), 1.0, atol=1e-5)  # same direction


def test_routing_is_per_token(library, tiny_gpt2_dir):
    """One expert and top_k=1 is that adapter's plain LoRA; top 3 of 3 differs from top 2; greedy
    KV-cache generation equals recomputing the whole sequence at every step (each new token is
    routed on its own)."""
    model, params = from_pretrained(tiny_gpt2_dir)
    bank = multi.load_bank(library, params)
    one = arrow.arrow_router({"t1": bank.configs["t1"]}, {"t1": bank.adapters["t1"]})
    np.testing.assert_allclose(arrow.apply_arrow(model.apply, arrow.ArrowConfig(top_k=1))(params, one, IDS),
                               lj.apply(model.apply, bank.configs["t1"])(params, bank.adapters["t1"], IDS), atol=1e-5)
    router = _router(bank, gks=False)
    g2, g3 = (arrow.apply_arrow(model.apply, arrow.ArrowConfig(top_k=k)) for k in (2, 3))
    assert np.abs(np.asarray(g2(params, router, IDS)) - np.asarray(g3(params, router, IDS))).max() > 1e-3

    prompt = IDS[:1, :4]
    rows = generate(lambda p, *a, **k: g2(p, router, *a, **k), params, prompt, model=model, max_new_tokens=3,
                    eos_token_id=None)
    ids = prompt
    for _ in range(3):
        ids = np.concatenate([ids, np.argmax(np.asarray(g2(params, router, ids))[:, -1:], -1)], axis=1)
    np.testing.assert_array_equal(rows, ids[:, 4:])


def test_refusals(library, tiny_gpt2_dir):
    model, params = from_pretrained(tiny_gpt2_dir)
    bank = multi.load_bank(library, params)
    task = {n: bank.configs[n] for n in TASKS}, {n: bank.adapters[n] for n in TASKS}
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        arrow.ArrowConfig(top_k=0)
    with pytest.raises(ValueError, match="router_temperature must be a positive number"):
        arrow.ArrowConfig(router_temperature=0.0)
    router = arrow.arrow_router(*task)
    with pytest.raises(ValueError, match="top_k=4 exceeds the 3 adapters"):
        arrow.apply_arrow(model.apply, arrow.ArrowConfig(top_k=4))(params, router, IDS)
    r8 = lj.LoraConfig(rank=8, targets=["c_attn", "c_fc"])
    with pytest.raises(ValueError, match="adapter 'x' at .* Arrow needs one rank"):
        arrow.arrow_router({**task[0], "x": r8}, {**task[1], "x": lj.init(r8, params, jax.random.key(0))})
    qkv = lj.LoraConfig(rank=4, targets=["c_attn"])
    with pytest.raises(ValueError, match="adapter 'x' adapts .* the same weights in every adapter"):
        arrow.arrow_router({**task[0], "x": qkv}, {**task[1], "x": lj.init(qkv, params, jax.random.key(0))})
    dora = dataclasses.replace(bank.configs["t0"], use_dora=True)
    with pytest.raises(ValueError, match=r"adapters \['t0'\] use DoRA, which Arrow cannot"):
        arrow.arrow_router({**task[0], "t0": dora}, task[1])
    with pytest.raises(ValueError, match="general configs .* must name the same adapters"):
        arrow.arrow_router(*task, {"g0": bank.configs["g0"]}, {})
    with pytest.raises(lj.FallbackError, match="mixes its adapters per token: it has no single weight"):
        arrow.apply_arrow(lambda p, x: jnp.sum(p["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"]) * x)(
            params, router, 1.0)
