"""LoRA-GA init (PEFT `init_lora_weights="lora_ga"`): against PEFT's preprocess_loraga +
lora_ga_init on the same BLOOM checkpoint and batches; the scalings; what is refused."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from lora_jax.models import from_pretrained

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from test_peft import hf_model  # noqa: E402

# Two 4-token sequences: each gradient has rank 6 (3 scored positions each), between 2r, so
# that every singular vector used is determined, and 4r, so that PEFT's torch.svd_lowrank(q=4r)
# is exact: both sides find the same singular vectors (up to sign).
_RNG = np.random.default_rng(0)
BATCHES = [_RNG.integers(0, 250, (1, 4)) for _ in range(2)]
TARGETS = ["query_key_value", "dense_h_to_4h"]
CONFIG = lj.LoraConfig(rank=2, alpha=4, targets=TARGETS, init="lora_ga")


def causal_loss(model):
    def loss(p, ids):  # HF's labels=input_ids loss: the mean next-token cross-entropy
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, ids)[:, :-1], ids[:, 1:]).mean()
    return loss


@pytest.mark.parametrize("direction,scale", [("ArB2r", "stable"), ("ArBr", "gd_scale")])
def test_lora_ga_matches_peft(direction, scale, tiny_bloom_dir):
    hf = hf_model(tiny_bloom_dir)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, init_lora_weights="lora_ga",
                          lora_ga_config=peft.LoraGAConfig(direction=direction, scale=scale))

    def train_step():
        for b in BATCHES:
            ids = torch.tensor(b)
            hf(input_ids=ids, labels=ids).loss.backward()
    peft.preprocess_loraga(hf, cfg, train_step)
    theirs = {k: v.detach().numpy() for k, v in peft.get_peft_model(hf, cfg).state_dict().items()}

    model, params = from_pretrained(tiny_bloom_dir)
    res, adapters = lj.init_lora_ga(CONFIG, params, causal_loss(model), [jnp.asarray(b) for b in BATCHES],
                                    ga=lj.LoraGAConfig(direction=direction, scale=scale))
    for i in range(model.config.num_layers):
        for mod in ("self_attention.query_key_value", "mlp.dense_h_to_4h"):
            pre = f"base_model.model.transformer.h.{i}.{mod}"
            path = f"transformer/h/{i}/{mod.replace('.', '/')}/kernel"
            # torch (r, in) / (out, r) are ours transposed; each singular vector's sign is free.
            for ours, want in ((adapters[path]["lora_A"], theirs[f"{pre}.lora_A.default.weight"].T),
                               (adapters[path]["lora_B"].T, theirs[f"{pre}.lora_B.default.weight"])):
                ours = np.asarray(ours)
                sign = np.sign(np.sum(ours * want, axis=0))
                np.testing.assert_allclose(ours * sign, want, atol=2e-5, rtol=1e-4)
    ids = jnp.asarray(np.concatenate(BATCHES))
    np.testing.assert_allclose(lj.apply(model.apply, CONFIG)(res, adapters, ids), model.apply(params, ids),
                               atol=1e-4, rtol=0)  # W_res + s*A*B = W0: unchanged at step 0


def test_lora_ga_scalings_and_refusals(tiny_bloom_dir):
    grad = np.random.default_rng(1).normal(size=(12, 20))  # [in, out]
    w = np.random.default_rng(2).normal(size=(12, 20))
    rng = np.random.default_rng(0)
    u, s, vh = np.linalg.svd(grad.T, full_matrices=False)
    a, b = lj.lora_ga.ga_factors(grad, w, 3, 2.0, lj.LoraGAConfig(direction="A2rBr", scale="unit"), rng)
    np.testing.assert_allclose(np.abs(a), np.abs(vh[3:6].T), atol=1e-12)  # A: right vectors r..2r
    np.testing.assert_allclose(np.abs(b), np.abs(u[:, :3] * s[:3]).T, atol=1e-12)  # B: left ones 0..r, times S
    _, b = lj.lora_ga.ga_factors(grad, w, 3, 2.0, lj.LoraGAConfig(scale="weight_svd"), rng)
    assert np.isclose(np.linalg.norm(b[0]), np.linalg.svd(w, compute_uv=False)[0])  # B's first column: sigma_max(W0)
    a, b = lj.lora_ga.ga_factors(grad, w, 3, 2.0, lj.LoraGAConfig(direction="random", scale="unit"), rng)
    picked = np.argmax(np.abs(vh[:6] @ a), axis=0)  # the same random r of the 2r pairs for A and B
    np.testing.assert_allclose(np.abs(b), np.abs(u[:, picked] * s[picked]).T, atol=1e-12)

    model, params = from_pretrained(tiny_bloom_dir)
    batches = [jnp.asarray(BATCHES[0])]
    with pytest.raises(ValueError, match="init_lora_ga needs a config with init='lora_ga'"):
        lj.init_lora_ga(dataclasses.replace(CONFIG, init="corda"), params, causal_loss(model), batches)
    with pytest.raises(ValueError, match=r"2r = 50 singular directions of .* use a rank <= 24"):
        lj.init_lora_ga(dataclasses.replace(CONFIG, rank=25), params, causal_loss(model), batches)
    with pytest.raises(ValueError, match=r"init_lora_ga\(config, params, loss_fn, batches\)"):
        lj.init(CONFIG, params, jax.random.key(0))
    with pytest.raises(ValueError, match=r"'transformer/h/0/mlp/dense_h_to_4h/kernel' is QuantizedArray: initialise before quant"):
        lj.init_lora_ga(CONFIG, lj.quant.quantize(params), causal_loss(model), batches)
    with pytest.raises(ValueError, match="LoraGAConfig.direction 'AB'"):
        lj.LoraGAConfig(direction="AB")
