"""CorDA init (PEFT `init_lora_weights="corda"`): against PEFT's preprocess_corda + corda_init on
the same checkpoint and samples, IPM and KPM; stacked layers; the way back to plain LoRA."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax.models import from_pretrained

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from test_peft import hf_model  # noqa: E402

SAMPLES = np.random.default_rng(0).integers(0, 250, (6, 1, 10))  # PEFT's CorDA runs one sample per call
CONFIG = lj.LoraConfig(rank=4, alpha=8, targets=["c_attn", "c_fc"], init="corda")


def forward(model):
    return lambda p, ids: model.apply(p, ids)


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_matches_peft(method, tiny_gpt2_dir):
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    hf = hf_model(tiny_gpt2_dir)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], init_lora_weights="corda",
                          corda_config=CordaConfig(corda_method=method))
    preprocess_corda(hf, cfg, run_model=lambda: [hf(torch.tensor(s)) for s in SAMPLES])
    theirs = {k: v.detach().numpy() for k, v in peft.get_peft_model(hf, cfg).state_dict().items()}

    model, params = from_pretrained(tiny_gpt2_dir)
    res, adapters = lj.init_corda(CONFIG, params, forward(model), [jnp.asarray(s, jnp.int32) for s in SAMPLES],
                                  method=method)
    flat = lj.tree.flatten(res)
    for i in range(model.config.num_layers):
        for mod in ("attn.c_attn", "mlp.c_fc"):
            pre = f"base_model.model.transformer.h.{i}.{mod}"
            path = f"transformer/h/{i}/{mod.replace('.', '/')}/kernel"
            # GPT-2's Conv1D keeps (in, out), as we do; lora_A (r, in) and lora_B (out, r) are ours transposed.
            np.testing.assert_allclose(flat[path], theirs[f"{pre}.base_layer.weight"], atol=1e-4, rtol=0)
            a, b = np.asarray(adapters[path]["lora_A"]), np.asarray(adapters[path]["lora_B"])
            sign = np.sign(np.sum(a * theirs[f"{pre}.lora_A.default.weight"].T, axis=0))  # an SVD's signs are free
            np.testing.assert_allclose(a * sign, theirs[f"{pre}.lora_A.default.weight"].T, atol=2e-4, rtol=1e-3)
            np.testing.assert_allclose(b * sign[:, None], theirs[f"{pre}.lora_B.default.weight"].T, atol=2e-4,
                                       rtol=1e-3)
    # The model is unchanged at step 0: W_res + s*A*B = W0.
    ids = jnp.asarray(SAMPLES[:2, 0], jnp.int32)
    np.testing.assert_allclose(lj.apply(model.apply, CONFIG)(res, adapters, ids), model.apply(params, ids),
                               atol=1e-4, rtol=0)


def test_corda_on_stacked_layers_padded_batches_and_back_to_plain(tiny_gpt2_dir):
    batches = [jnp.asarray(s, jnp.int32) for s in SAMPLES]
    model, params = from_pretrained(tiny_gpt2_dir)
    res, adapters = lj.init_corda(CONFIG, params, forward(model), batches)
    # The same samples three to a batch, padded with masked garbage: each sample still counts on its own.
    padded = np.concatenate([SAMPLES[:, 0], np.full((6, 2), 77)], axis=1)  # [6, 12]
    mask = np.concatenate([np.ones((6, 10)), np.zeros((6, 2))], axis=1).astype(np.int32)
    three = [{"ids": jnp.asarray(padded[i:i + 3]), "mask": jnp.asarray(mask[i:i + 3])} for i in (0, 3)]
    scanned, sparams = from_pretrained(tiny_gpt2_dir, scan_layers=True)
    sres, sadapters = lj.init_corda(CONFIG, sparams, lambda p, b: scanned.apply(p, b["ids"], b["mask"]), three,
                                    mask=lambda b: b["mask"])
    flat, sflat = lj.tree.flatten(res), lj.tree.flatten(sres)
    for i in range(model.config.num_layers):
        p = f"transformer/h/{i}/mlp/c_fc/kernel"
        np.testing.assert_allclose(sflat["transformer/h/mlp/c_fc/kernel"][i], flat[p], atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.abs(sadapters["transformer/h/mlp/c_fc/kernel"]["lora_A"][i]),
                                   np.abs(adapters[p]["lora_A"]), atol=1e-5, rtol=1e-4)
    # Trained adapters on W_res are plain rank-2r LoRA on W0.
    trained = jax.tree.map(lambda x: x * 1.1, adapters)
    plain_config, plain = lj.to_plain(CONFIG, trained, adapters)
    ids = batches[0][:, :8]
    np.testing.assert_allclose(lj.apply(model.apply, plain_config)(params, plain, ids),
                               lj.apply(model.apply, CONFIG)(res, trained, ids), atol=1e-4, rtol=0)


def test_corda_refuses_what_it_cannot_do(tiny_gpt2_dir):
    model, params = from_pretrained(tiny_gpt2_dir)
    batches = [jnp.asarray(SAMPLES[0], jnp.int32)]
    with pytest.raises(ValueError, match="init_corda needs a config with init='corda'"):
        lj.init_corda(dataclasses.replace(CONFIG, init="pissa"), params, forward(model), batches)
    with pytest.raises(ValueError, match="CorDA method 'xpm'"):
        lj.init_corda(CONFIG, params, forward(model), batches, method="xpm")
    with pytest.raises(ValueError, match=r"lora_jax.init_corda\(config, params, f, batches\) -> \(params, adapters\)"):
        lj.init_residual(CONFIG, params, jax.random.key(0))
    with pytest.raises(ValueError, match="CorDA needs the inputs of 'transformer/wte/embedding'"):
        lj.init_corda(dataclasses.replace(CONFIG, targets=["wte", "c_fc"]), params, forward(model), batches)
    with pytest.raises(ValueError, match="covariance trace 0"):
        lj.corda.damped(np.zeros((4, 4)), "x/kernel")
