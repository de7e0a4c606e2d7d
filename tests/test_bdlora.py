"""BD-LoRA (PEFT's use_bdlora): PEFT's logits, gradients and files both ways; init, training with
the off-block zeros fixed, the orbax round trip and the refusals."""

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
from lora_jax import bdlora, checkpoint, multi
from lora_jax import peft as lp
from lora_jax.models import from_pretrained

IDS = np.array([[5, 9, 17, 33, 2, 7], [40, 41, 42, 3, 3, 3]])
TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
# Row-sharded layers get a block-diagonal A, column-sharded ones B (PEFT's guidance).
BD = dict(target_modules_bd_a=["self_attention.dense", "dense_4h_to_h"],
          target_modules_bd_b=["query_key_value", "dense_h_to_4h"], nblocks=2)
QKV, OUT = "transformer/h/0/self_attention/query_key_value/kernel", "transformer/h/0/mlp/dense_4h_to_h/kernel"


def _config(**kw) -> lj.LoraConfig:
    return lj.LoraConfig(rank=4, alpha=8, targets=TARGETS, use_bdlora=lj.BdLoraConfig(**BD), **kw)


@pytest.mark.parametrize("scan", [False, True])
def test_matches_peft_both_ways(scan, tiny_bloom_dir, tmp_path, nudge_torch, peft_grads):
    """A PEFT BD-LoRA adapter (every factor nonzero) gives PEFT's logits and gradients, unrolled
    and scanned; merged, the same logits; our export holds PEFT's very tensors and loads back."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.config import BdLoraConfig
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    hf = lambda: AutoModelForCausalLM.from_pretrained(tiny_bloom_dir, attn_implementation="eager")  # noqa: E731
    pm = nudge_torch(peft.get_peft_model(hf(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                               use_bdlora=BdLoraConfig(**BD))), seed=3)
    pm.save_pretrained(tmp_path / "theirs")
    want = pm(torch.tensor(IDS)).logits.detach().numpy()
    want_grads = peft_grads(pm, IDS)
    n_peft = pm.get_nb_trainable_parameters()[0]

    model, params = from_pretrained(tiny_bloom_dir, scan_layers=scan)
    got = lp.load_peft(tmp_path / "theirs", params)
    config = got.config
    assert config.use_bdlora == lj.BdLoraConfig(**BD)
    out = OUT.replace("/h/0/", "/h/") if scan else OUT
    a = np.asarray(got.adapters[out]["lora_A"])  # [*S, 192, 4]: two blocks of 96 x 2
    assert a.shape == ((2,) if scan else ()) + (192, 4)
    assert not a[..., :96, 2:].any() and not a[..., 96:, :2].any() and a[..., :96, :2].all()
    assert lj.summary(config, params, got.adapters).trainable == n_peft  # the blocks alone, as PEFT counts

    g = lj.apply(model.apply, config, strict=True)
    np.testing.assert_allclose(g(params, got.adapters, IDS), want, atol=1e-5)
    merged = lj.merge(config, jax.tree.map(jnp.array, params), got.adapters)
    np.testing.assert_allclose(model.apply(merged, IDS), want, atol=1e-5)

    grads = jax.grad(lambda ad: (g(params, ad, IDS) ** 2).mean())(got.adapters)
    for p, ab in want_grads.items():  # PEFT's are the blocks' (transposed: (in/n, r), (r/n, out))
        q = p.replace("/h/0/", "/h/").replace("/h/1/", "/h/") if scan else p
        i = int(p.split("/h/")[1].split("/")[0])
        side = bdlora.side(config, p)
        for k, v in ab.items():
            ours = np.asarray(grads[q][k][i] if scan else grads[q][k])
            if side == k[-1].lower():  # the block-diagonal factor: its off-block gradient is exactly zero
                mask = bdlora.block_mask(2, *ours.shape)
                assert not (ours * (1 - mask)).any(), (p, k)
                ours = bdlora.blocks(ours.T, 2).T
            np.testing.assert_allclose(ours, v, atol=1e-5, rtol=1e-4, err_msg=f"{p} {k}")

    ours = lp.save_peft(tmp_path / "ours", config, got.adapters, model_config=model.config)
    assert json.loads((ours / lp.CONFIG_FILE).read_text())["use_bdlora"] == {**BD, "match_strict": True}
    theirs, mine = load_file(tmp_path / "theirs" / lp.WEIGHTS_FILE), load_file(ours / lp.WEIGHTS_FILE)
    assert sorted(theirs) == sorted(mine)
    for k in mine:
        np.testing.assert_array_equal(mine[k], theirs[k], err_msg=k)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. PEFT's "missing adapter keys"
        back = peft.PeftModel.from_pretrained(hf(), str(ours)).eval()
    np.testing.assert_allclose(back(torch.tensor(IDS)).logits.detach().numpy(), want, atol=1e-5)


def test_init_trains_and_round_trips(tiny_bloom_dir, tmp_path, jax_train):
    """init: a block-diagonal A drawn as PEFT's (uniform within sqrt(6 / (in/n))), B = 0, so the model
    starts as the base. Adam steps train the blocks and leave the off-block zeros exactly zero;
    stray off-block values change neither apply (either strategy) nor merge; the orbax checkpoint round-trips."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.config import BdLoraConfig
    from transformers import AutoModelForCausalLM

    model, params = from_pretrained(tiny_bloom_dir)
    config = _config()
    adapters = lj.init(config, params, jax.random.key(0))
    a, b = np.asarray(adapters[OUT]["lora_A"]), np.asarray(adapters[QKV]["lora_B"])
    bound = np.sqrt(6 / (192 // 2))  # torch's kaiming_uniform_ with its default a=0, as PEFT draws it
    assert np.abs(a).max() <= bound and np.abs(a[:96, :2]).max() > 0.8 * bound and not a[:96, 2:].any()
    assert not b.any() and adapters[QKV]["lora_B"].shape == (4, 144)
    torch.manual_seed(0)
    pm = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_bloom_dir), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, use_bdlora=BdLoraConfig(**BD)))
    theirs = pm.base_model.model.transformer.h[0].mlp.dense_4h_to_h.lora_A["default"].weight.detach().numpy()
    assert theirs.shape == (4, 96) and np.abs(theirs).max() <= bound and np.abs(theirs).max() > 0.8 * bound
    g = lj.apply(model.apply, config)
    np.testing.assert_allclose(g(params, adapters, IDS), model.apply(params, IDS), atol=1e-6)

    def loss(params, adapters, ids):
        logits = g(params, adapters, ids[:, :-1])
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1).mean()
    trainable, _, first, last = jax_train(loss, optax.adamw(1e-2, weight_decay=0.1), config, params, adapters, IDS, 4)
    assert last < first
    trained = trainable["adapters"]
    for p, k in ((OUT, "lora_A"), (QKV, "lora_B")):
        x = np.asarray(trained[p][k])
        mask = bdlora.block_mask(2, *x.shape)
        assert not (x * (1 - mask)).any(), (p, k)  # the off-block zeros never train
        assert np.abs(x - np.asarray(adapters[p][k])).max() > 1e-3, (p, k)

    stray = {p: {k: v + 1.0 for k, v in ab.items()} for p, ab in trained.items()}  # off-block values too
    masked = bdlora.mask_adapters(config, stray)
    np.testing.assert_array_equal(g(params, stray, IDS), g(params, masked, IDS))
    merged_apply = lj.apply(model.apply, config, strategy="merged")  # the merged strategy masks them too
    np.testing.assert_array_equal(merged_apply(params, stray, IDS), merged_apply(params, masked, IDS))
    off = jax.grad(lambda a: merged_apply(params, a, IDS).std())(stray)[QKV]["lora_B"]
    assert not (np.asarray(off) * (1 - bdlora.block_mask(2, *off.shape))).any()  # and get no gradient
    m1 = lj.merge(config, jax.tree.map(jnp.array, params), stray)
    m2 = lj.merge(config, jax.tree.map(jnp.array, params), masked)
    for x, y in zip(jax.tree.leaves(m1), jax.tree.leaves(m2)):
        np.testing.assert_array_equal(x, y)

    checkpoint.save(tmp_path / "ck", config, trained)
    back = checkpoint.load(tmp_path / "ck", params)
    assert back.config == config
    np.testing.assert_array_equal(back.adapters[OUT]["lora_A"], trained[OUT]["lora_A"])
    assert lj.LoraConfig.from_json(config.to_json()) == config


def test_to_lora_and_refusals(tiny_gpt2_dir, tiny_bloom_dir, tmp_path):
    """to_lora gives plain LoRA with the same function (for multi); every mix BD-LoRA cannot hold
    is refused by name, and so are bad layouts, before anything is written."""
    model, params = from_pretrained(tiny_bloom_dir)
    config = _config()
    adapters = lj.init(config, params, jax.random.key(1))
    adapters = {p: {k: v + 0.05 for k, v in ab.items()} for p, ab in adapters.items()}  # stray off-block values
    g = lj.apply(model.apply, config)
    plain_cfg, plain = bdlora.to_lora(config, adapters)
    assert plain_cfg.use_bdlora is None
    bank = multi.multi(model.apply, {"bd": plain_cfg, "base": plain_cfg})
    got = bank.mixed(params, {"bd": plain, "base": plain}, IDS, adapter_ids=bank.ids(["bd", None]))
    np.testing.assert_allclose(got, jnp.stack([g(params, adapters, IDS)[0], model.apply(params, IDS)[1]]), atol=1e-5)
    with pytest.raises(ValueError, match=r"adapters \['bd'\] are BD-LoRA .* lora_jax.bdlora.to_lora"):
        multi.multi(model.apply, {"bd": config})
    with pytest.raises(ValueError, match="reduce_intruders: BD-LoRA"):
        lj.reduce_intruders(config, params, adapters)
    with pytest.raises(ValueError, match="lorafa .* BD-LoRA"):
        lj.lorafa(config, optax.adam(1e-3))
    with pytest.raises(ValueError, match="init_loftq .* BD-LoRA"):
        lj.init_loftq(config, params)

    for kw, msg in ((dict(use_dora=True), "not with use_dora"), (dict(lora_bias=True), "not with lora_bias"),
                    (dict(velora_num_groups=4), "not with velora"), (dict(use_kasa=True), "not with use_kasa"),
                    (dict(init="orthogonal"), "init must be 'kaiming_uniform' or 'gaussian', got 'orthogonal'")):
        with pytest.raises(ValueError, match=msg):
            _config(**kw)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['blocks'\] of BdLoraConfig"):
        lj.LoraConfig(use_bdlora={"blocks": 2})
    with pytest.raises(ValueError, match="nblocks must be a positive integer, got 0"):
        lj.BdLoraConfig(nblocks=0)
    with pytest.raises(ValueError, match=r"lora_A of 'transformer/h/0/mlp/dense_4h_to_h/kernel' \(\{'in': 192, "
                                         r"'r': 4\}\) cannot hold 8 diagonal blocks: nblocks does not divide "
                                         r"\{'r': 4\}"):
        lj.init(dataclasses.replace(config, use_bdlora=dataclasses.replace(config.use_bdlora, nblocks=8)), params,
                jax.random.key(0))
    strict = lj.LoraConfig(rank=4, targets=TARGETS, use_bdlora=lj.BdLoraConfig(target_modules_bd_a=["dense"]))
    with pytest.raises(ValueError, match="matches both target_modules_bd_a"):
        lj.target_paths(dataclasses.replace(strict, use_bdlora=lj.BdLoraConfig(
            target_modules_bd_a=["dense"], target_modules_bd_b=["h_to_4h"])), params)
    with pytest.raises(ValueError, match="'transformer.h.0.self_attention.query_key_value' matches neither .*"
                                         "match_strict=False"):
        lj.target_paths(strict, params)
    loose = dataclasses.replace(strict, use_bdlora=lj.BdLoraConfig(target_modules_bd_a=["dense"], match_strict=False))
    assert bdlora.side(loose, QKV) is None and bdlora.side(loose, OUT) == "a"
    with pytest.raises(ValueError, match="BD-LoRA .* 'transformer/word_embeddings/embedding' is not one"):
        lj.target_paths(lj.LoraConfig(rank=4, targets=["word_embeddings"], use_bdlora=lj.BdLoraConfig(
            target_modules_bd_b=["word_embeddings"])), params)

    gpt2, gparams = from_pretrained(tiny_gpt2_dir)
    gcfg = lj.LoraConfig(rank=4, alpha=8, use_bdlora=lj.BdLoraConfig(target_modules_bd_b=["c_attn"], nblocks=2))
    with pytest.raises(ValueError, match="PEFT's BD-LoRA takes nn.Linear layers only, not this model's Conv1D"):
        lp.save_peft(tmp_path / "x", gcfg, lj.init(gcfg, gparams, jax.random.key(0)), model_config=gpt2.config)
    assert not (tmp_path / "x").exists()

    lp.save_peft(tmp_path / "ok", config, adapters, model_config=model.config)
    cfg = json.loads((tmp_path / "ok" / lp.CONFIG_FILE).read_text())
    (tmp_path / "ok" / lp.CONFIG_FILE).write_text(json.dumps(cfg | {"use_bdlora": {**BD, "nblocks": 4}}))
    with pytest.raises(ValueError, match=r"transformer.h.0.mlp.dense_h_to_4h: BD-LoRA lora_B \(192, 2\) is not 4 "
                                         r"diagonal blocks \(out, r/n\) with r = 4: check use_bdlora's nblocks"):
        lp.load_peft(tmp_path / "ok", params)
    (tmp_path / "ok" / lp.CONFIG_FILE).write_text(json.dumps(cfg | {"use_bdlora": {**BD, "shards": 2}}))
    with pytest.raises(ValueError, match="use_bdlora .* is not PEFT's BdLoraConfig"):
        lp.load_peft(tmp_path / "ok", params)
