"""KaSA (PEFT's kasa_config): PEFT's truncated base, outputs, gradients and regulariser both ways;
init, training and refusals."""

from __future__ import annotations

import dataclasses
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from lora_jax import checkpoint, multi
from lora_jax import peft as lp
from lora_jax.models import from_pretrained

IDS = np.array([[5, 9, 17, 33, 2, 7], [40, 41, 42, 3, 3, 3]])
TARGETS = ["query_key_value", "dense_h_to_4h"]
KASA_WARNING = "KaSA adapters act on the truncated base"


@pytest.mark.parametrize("scan", [False, True])
def test_matches_peft_both_ways(scan, tiny_bloom_dir, tmp_path, nudge_torch, peft_grads):
    """A PEFT KaSA adapter (A, B and the diagonal all nonzero) gives PEFT's logits, gradients and
    regulariser on `kasa_base` of the stock weights (and not on the stock weights); merging
    gives the same logits; our export loads back into PEFT with the same logits."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.config import KasaConfig
    from transformers import AutoModelForCausalLM

    hf = lambda: AutoModelForCausalLM.from_pretrained(tiny_bloom_dir, attn_implementation="eager")  # noqa: E731
    pm = nudge_torch(peft.get_peft_model(hf(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, kasa_config=KasaConfig(beta=0.01, gamma=0.1))), seed=5)
    pm.save_pretrained(tmp_path / "theirs")
    want = pm(torch.tensor(IDS)).logits.detach().numpy()
    want_reg = float(pm.base_model._get_kasa_loss().detach())
    want_grads = peft_grads(pm, IDS)
    truncated = pm.base_model.model.transformer.h[1].self_attention.query_key_value.base_layer.weight.detach().numpy()

    model, params = from_pretrained(tiny_bloom_dir, scan_layers=scan)
    with pytest.warns(UserWarning, match=KASA_WARNING):
        got = lp.load_peft(tmp_path / "theirs", params)
    config = got.config
    assert (config.use_kasa, config.kasa_beta, config.kasa_gamma) == (True, 0.01, 0.1)
    base = lj.kasa_base(config, params)
    qkv = "transformer/h/self_attention/query_key_value/kernel" if scan else \
        "transformer/h/1/self_attention/query_key_value/kernel"
    w = lj.tree.flatten(base)[qkv]
    np.testing.assert_allclose(w[1] if scan else w, truncated.T, atol=2e-6)  # PEFT's (out, in), ours [in, out]
    assert np.linalg.matrix_rank(np.asarray(w[1] if scan else w), tol=1e-4) == 48 - 4

    g = lj.apply(model.apply, config, strict=True)
    np.testing.assert_allclose(g(base, got.adapters, IDS), want, atol=1e-4)
    assert np.abs(np.asarray(g(params, got.adapters, IDS)) - want).max() > 1e-2  # the truncation matters
    np.testing.assert_allclose(lj.kasa_loss(config, got.adapters), want_reg, rtol=1e-5)
    merged = lj.merge(config, jax.tree.map(jnp.array, base), got.adapters)
    np.testing.assert_allclose(model.apply(merged, IDS), want, atol=1e-4)

    grads = jax.grad(lambda a: (g(base, a, IDS) ** 2).mean())(got.adapters)
    for p, ab in want_grads.items():
        q = p.replace("/h/0/", "/h/").replace("/h/1/", "/h/") if scan else p
        i = int(p.split("/h/")[1].split("/")[0])
        for k, v in ab.items():
            ours = np.asarray(grads[q][k][i] if scan else grads[q][k])
            np.testing.assert_allclose(ours, v, atol=1e-5, rtol=1e-4, err_msg=f"{p} {k}")

    out = lp.save_peft(tmp_path / "ours", config, got.adapters, model_config=model.config)
    cfg = json.loads((out / lp.CONFIG_FILE).read_text())
    assert cfg["kasa_config"] == {"beta": 0.01, "gamma": 0.1}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. PEFT's "missing adapter keys"
        back = peft.PeftModel.from_pretrained(hf(), str(out)).eval()
    np.testing.assert_allclose(back(torch.tensor(IDS)).logits.detach().numpy(), want, atol=1e-5)


def test_init_trains_and_round_trips(tiny_bloom_dir, tmp_path, jax_train):
    """init_kasa: the base loses exactly its r smallest singular values, B = 0 (so the model is the
    truncated base), a random diagonal; scanned params truncate per layer as unrolled ones do.
    A few steps of task loss + kasa_loss train all three leaves, and the orbax checkpoint comes
    back with a warning that names kasa_base."""
    model, params = from_pretrained(tiny_bloom_dir)
    config = lj.LoraConfig(rank=4, alpha=8, targets=TARGETS, use_kasa=True)
    base, adapters = lj.init_kasa(config, params, jax.random.key(0))
    p = "transformer/h/0/self_attention/query_key_value/kernel"
    before = np.linalg.svd(np.asarray(lj.tree.flatten(params)[p]), compute_uv=False)  # 48 values
    after = np.linalg.svd(np.asarray(lj.tree.flatten(base)[p]), compute_uv=False)
    np.testing.assert_allclose(after[:44], before[:44], rtol=1e-5)
    assert after[44:].max() < 1e-4 * before[0]
    assert {k: v.shape for k, v in adapters[p].items()} == {"lora_A": (48, 4), "lora_B": (4, 144), "lora_diag": (4,)}
    assert float(jnp.abs(adapters[p]["lora_diag"]).min()) > 0
    g = lj.apply(model.apply, config)
    np.testing.assert_allclose(g(base, adapters, IDS), model.apply(base, IDS), atol=1e-6)
    with pytest.raises(ValueError, match="use_kasa .* truncates the base weights: use lora_jax.init_kasa"):
        lj.init(config, params, jax.random.key(0))

    scanned_model, scanned = from_pretrained(tiny_bloom_dir, scan_layers=True)
    stack = lj.tree.flatten(lj.kasa_base(config, scanned))["transformer/h/self_attention/query_key_value/kernel"]
    np.testing.assert_allclose(stack[0], lj.tree.flatten(base)[p], atol=1e-6)

    def loss(params, adapters, ids):
        logits = g(params, adapters, ids[:, :-1])
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1).mean()
        return nll + lj.kasa_loss(config, adapters)
    trainable, _, first, last = jax_train(loss, optax.adam(1e-2), config, base, adapters, IDS, 4)
    assert last < first
    for k in ("lora_A", "lora_B", "lora_diag"):
        assert np.abs(np.asarray(trainable["adapters"][p][k] - adapters[p][k])).max() > 1e-3, k

    checkpoint.save(tmp_path / "ck", config, trainable["adapters"])
    with pytest.warns(UserWarning, match=KASA_WARNING + ".*kasa_base"):
        back = checkpoint.load(tmp_path / "ck", params)
    assert back.config == config
    np.testing.assert_array_equal(back.adapters[p]["lora_diag"], trainable["adapters"][p]["lora_diag"])
    bad = {q: dict(ab, lora_diag=ab["lora_diag"][:3]) for q, ab in trainable["adapters"].items()}
    with pytest.raises(ValueError, match=r"lora_diag \(3,\) \(expected \[\*S, in, r\], \[\*S, r, out\] and \[\*S, r\]"):
        g(base, bad, IDS)


def test_regulariser_value():
    """kasa_loss is beta * sum(d^2) + gamma * (||B B^T - I|| + ||A^T A - I||), per matrix of a stack."""
    rng = np.random.default_rng(0)
    a, b, d = rng.normal(size=(2, 6, 3)), rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 3))
    config = lj.LoraConfig(rank=3, use_kasa=True, kasa_beta=0.5, kasa_gamma=2.0)
    want = sum(0.5 * (d[i] ** 2).sum() + 2.0 * (np.linalg.norm(b[i] @ b[i].T - np.eye(3))
                                               + np.linalg.norm(a[i].T @ a[i] - np.eye(3))) for i in range(2))
    got = lj.kasa_loss(config, {"w": {"lora_A": a, "lora_B": b, "lora_diag": d}, "t": {lj.TOKENS: np.ones((1, 2))}})
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_train_step_adds_the_regulariser():
    """train.loop's step (what `python -m train.squad --kasa` runs) adds regularizer(adapters) once
    to the mean token loss: plain SGD moves d by the token gradient plus 2 d, over two micro-batches."""
    from train.loop import StepConfig, make_step

    def loss_fn(params, adapters, micro, rng):  # (sum of token losses, tokens): 2 tokens per micro-batch
        return 2.0 * jnp.sum(adapters["w"]["d"] * micro["v"][0]), jnp.float32(2.0)
    d = jnp.array([1.0, -2.0])
    step = make_step(loss_fn, optax.sgd(0.1), StepConfig(accum=2, micro_batch=1),
                     regularizer=lambda a: jnp.sum(a["w"]["d"] ** 2))
    batch = {"v": jnp.array([[[1.0, 3.0]], [[5.0, 7.0]]])}  # [accum, micro, 2]
    trainable, _, m = step({"adapters": {"w": {"d": d}}, "params": {}}, {}, optax.sgd(0.1).init(
        {"adapters": {"w": {"d": d}}, "params": {}}), batch, np.asarray(jax.random.key_data(jax.random.key(0))))
    token_grad = jnp.array([6.0, 10.0]) / 2  # sum over both micro-batches of 2 v, over 4 tokens
    np.testing.assert_allclose(trainable["adapters"]["w"]["d"], d - 0.1 * (token_grad + 2 * d), rtol=1e-6)
    np.testing.assert_allclose(m["loss"], float(jnp.sum(d * token_grad)), rtol=1e-6)
    np.testing.assert_allclose(m["regularizer"], 5.0)


def test_refusals(tiny_gpt2_dir, tiny_bloom_dir, tmp_path):
    for kw, msg in ((dict(use_dora=True), "not with use_dora"), (dict(velora_num_groups=4), "not with velora"),
                    (dict(alora_invocation_tokens=[3]), "not with alora"),
                    (dict(init="pissa"), "init must be one of .*got 'pissa'"),
                    (dict(kasa_beta=-1.0), "kasa_beta must be a number >= 0")):
        with pytest.raises(ValueError, match=msg):
            lj.LoraConfig(use_kasa=True, **kw)
    model, params = from_pretrained(tiny_gpt2_dir)
    kasa = lambda **kw: lj.LoraConfig(rank=4, alpha=8, use_kasa=True, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="KaSA .* 'transformer/wte/embedding' .* is not a linear layer"):
        lj.init_kasa(kasa(targets=["wte"]), params, jax.random.key(0))
    with pytest.raises(ValueError, match="KaSA .* keeps at least one: .* with rank 32 is too small"):
        lj.target_paths(dataclasses.replace(kasa(), rank=32), params)
    _, scanned = from_pretrained(tiny_gpt2_dir, scan_layers=True)
    with pytest.raises(ValueError, match="KaSA's diagonal and truncation would train in every layer"):
        lj.target_paths(kasa(layers_to_transform=[1]), scanned)
    with pytest.raises(ValueError, match="KaSA truncates .* full-precision values; got QuantizedArray"):
        lj.kasa_base(kasa(), lj.quant.quantize(params, block_size=32))
    base, adapters = lj.init_kasa(kasa(), params, jax.random.key(0))
    with pytest.raises(ValueError, match="PEFT's KaSA takes nn.Linear layers only, not this model's Conv1D"):
        lp.save_peft(tmp_path / "x", kasa(), adapters, model_config=model.config)
    assert not (tmp_path / "x").exists()
    plain = lj.LoraConfig(rank=4, alpha=8)
    with pytest.raises(ValueError, match=r"adapters \['k'\] are KaSA"):
        multi.multi(model.apply, {"k": kasa(), "p": plain})
    with pytest.raises(ValueError, match="reduce_intruders: KaSA adapters are not supported"):
        lj.reduce_intruders(kasa(), base, adapters)
    with pytest.raises(ValueError, match="lorafa .* not with use_kasa"):
        lj.lorafa(kasa(), optax.adam(1e-3))
    with pytest.raises(ValueError, match="init_loftq .* KaSA"):
        lj.init_loftq(kasa(), params)
