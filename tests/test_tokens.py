"""trainable_tokens (PEFT's trainable_token_indices): chosen embedding rows train in full, in the
lookup and the tied LM head, against PEFT both ways; training, merge, checkpoints, errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from lora_jax import checkpoint, multi
from lora_jax import peft as lp
from lora_jax.models import from_pretrained

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from test_peft import ATOL, IDS, hf_model, torch_logits  # noqa: E402
from test_squad import cli_args, tiny_squad  # noqa: E402

TOKENS = [3, 7, 300]  # ids the batch uses, so the lookup and the head both see the trained rows


@pytest.mark.parametrize("name,scan", [("gpt2", True), ("bloom", False)])
def test_trained_tokens_match_peft_both_ways(name, scan, tiny_gpt2_dir, tiny_bloom_dir, tmp_path, nudge_torch):
    base_dir = {"gpt2": tiny_gpt2_dir, "bloom": tiny_bloom_dir}[name]
    emb, lin = {"gpt2": ("wte", "c_attn"), "bloom": ("word_embeddings", "query_key_value")}[name]
    model, params = from_pretrained(base_dir, scan_layers=scan)
    config = lj.LoraConfig(rank=4, alpha=8, targets=[lin], trainable_tokens={emb: TOKENS})
    table = f"transformer/{emb}/embedding"
    g = lj.apply(model.apply, config, strict=True)  # strict: lookup and tied head stay factored

    # Train: the chosen rows and the LoRA factors move, optimizer state exists for those alone.
    def loss_fn(p, a, ids):
        return optax.softmax_cross_entropy_with_integer_labels(g(p, a, ids)[:, :-1], ids[:, 1:]).mean()

    adapters = lj.init(config, params, jax.random.key(0))
    np.testing.assert_array_equal(adapters[table][lj.TOKENS], params["transformer"][emb]["embedding"][np.array(TOKENS)])
    np.testing.assert_allclose(g(params, adapters, IDS), model.apply(params, IDS), atol=1e-5)
    ts = lj.make_train_step(loss_fn, optax.adam(1e-2))
    trainable, frozen = lj.split(config, params, adapters)
    opt, step = ts.init(trainable), jax.jit(ts.step)
    assert lj.tree.count(opt) == 2 * lj.tree.count(adapters) + 1  # Adam's two moments (+ its step count)
    for _ in range(3):
        trainable, opt, _ = step(trainable, frozen, opt, IDS)
    params, adapters = lj.join(trainable, frozen)
    moved = np.abs(np.asarray(adapters[table][lj.TOKENS]) - np.asarray(params["transformer"][emb]["embedding"])[TOKENS])
    assert moved.min(axis=-1).max() > 1e-3
    logits = np.asarray(jax.jit(g)(params, adapters, IDS))
    merged = lj.merge(config, jax.tree.map(jnp.array, params), adapters)
    np.testing.assert_allclose(model.apply(merged, IDS), logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(lj.apply(model.apply, config, strategy="merged")(params, adapters, IDS), logits,
                               atol=1e-5, rtol=0)

    # Export: PEFT loads it (no missing keys) and computes the same logits, tied head included.
    out = lp.save_peft(tmp_path / "ours", config, adapters, model_config=model.config, params=params)
    cfg = json.loads((out / lp.CONFIG_FILE).read_text())
    assert cfg["trainable_token_indices"] == TOKENS and "ensure_weight_tying" not in cfg
    state = lp.read_tensors(out / lp.WEIGHTS_FILE)
    assert state[f"base_model.model.transformer.{emb}.token_adapter.trainable_tokens_delta"].shape == \
        (3, model.config.hidden_size)
    with pytest.warns() as record:
        pm = peft.PeftModel.from_pretrained(hf_model(base_dir), str(out)).eval()
    assert not [w for w in record if "missing adapter keys" in str(w.message)]
    np.testing.assert_allclose(torch_logits(pm), logits, atol=ATOL, rtol=0)

    # Import: a PEFT-made adapter with moved rows gives PEFT's logits here.
    made = peft.get_peft_model(hf_model(base_dir), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=[lin], trainable_token_indices={emb: [1, 5, 300]}))
    nudge_torch(made, seed=3).save_pretrained(tmp_path / "peft_made")
    got = lp.load_peft(tmp_path / "peft_made", params, model_config=model.config)
    assert lj.token_rows(got.config, params) == {table: (1, 5, 300)}
    np.testing.assert_allclose(np.asarray(lj.apply(model.apply, got.config)(params, got.adapters, IDS)),
                               torch_logits(made), atol=ATOL, rtol=0)


def test_checkpoint_pissa_and_what_is_refused(tiny_gpt2_dir, tmp_path):
    model, params = from_pretrained(tiny_gpt2_dir)
    config = lj.LoraConfig(rank=4, targets=["c_attn"], trainable_tokens={"wte": TOKENS})
    adapters = lj.init(config, params, jax.random.key(0))
    adapters["transformer/wte/embedding"][lj.TOKENS] += 0.5
    checkpoint.save(tmp_path / "ad", config, adapters, params=params)
    back = checkpoint.load(tmp_path / "ad", params)
    assert back.config == config
    np.testing.assert_array_equal(back.adapters["transformer/wte/embedding"][lj.TOKENS],
                                  adapters["transformer/wte/embedding"][lj.TOKENS])
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    shapes["transformer"]["wte"]["embedding"] = jax.ShapeDtypeStruct((200, model.config.hidden_size), jnp.float32)
    with pytest.raises(ValueError, match=r"ad: the saved LoRA config does not fit.*token id\(s\) \[300\] are out of "
                                         r"range for 'transformer/wte/embedding' with 200 rows"):
        checkpoint.load(tmp_path / "ad", shapes)

    # PiSSA keeps the trained rows as they are through to_plain.
    pissa = lj.LoraConfig(rank=4, targets=["c_attn"], init="pissa", trainable_tokens={"wte": TOKENS})
    res, start = lj.init_residual(pissa, params, jax.random.key(0))
    np.testing.assert_allclose(lj.apply(model.apply, pissa)(res, start, IDS), model.apply(params, IDS), atol=1e-4)
    plain_cfg, plain = lj.to_plain(pissa, start, start)
    assert plain["transformer/wte/embedding"] == start["transformer/wte/embedding"]
    np.testing.assert_allclose(lj.apply(model.apply, plain_cfg)(params, plain, IDS), model.apply(params, IDS),
                               atol=1e-4)

    with pytest.raises(ValueError, match="unmerge cannot restore the embedding rows"):
        lj.unmerge(config, params, adapters)
    m = multi.multi(model.apply, {"t": config})
    with pytest.raises(ValueError, match=r"\['t'\] train embedding rows"):
        m.mixed(params, {"t": adapters}, IDS, adapter_ids=m.ids(["t", None]))
    np.testing.assert_allclose(m.switch(params, {"t": adapters}, IDS, adapter="t"),
                               lj.apply(model.apply, config)(params, adapters, IDS))


def test_bad_trainable_tokens_are_named(tiny_gpt2_dir):
    model, params = from_pretrained(tiny_gpt2_dir)
    for bad, what in [([], "non-empty list"), ([1, 1], r"token id\(s\) \[1\] more than once"), ([-1], "ints >= 0"),
                      ({"wte": "12"}, r"trainable_tokens\['wte'\] must be")]:
        with pytest.raises(ValueError, match=what):
            lj.LoraConfig(trainable_tokens=bad)
    init = lambda **kw: lj.init(lj.LoraConfig(targets=["c_attn"], **kw), params, jax.random.key(0))  # noqa: E731
    with pytest.raises(ValueError, match=r"one embedding table; these have 2: \['transformer/wpe/embedding', "
                                         r"'transformer/wte/embedding'\]|these have 2"):
        init(trainable_tokens=[1])
    with pytest.raises(ValueError, match=r"token id\(s\) \[10000\] are out of range for 'transformer/wte/embedding'"):
        init(trainable_tokens={"wte": [1, 10000]})
    with pytest.raises(ValueError, match=r"trainable_tokens\['lm_head'\] must select one embedding table"):
        init(trainable_tokens={"lm_head": [1]})
    with pytest.raises(ValueError, match="both a LoRA target and the table of trainable_tokens"):
        lj.init(lj.LoraConfig(targets=["c_attn", "wte"], trainable_tokens={"wte": [1]}), params, jax.random.key(0))
    with pytest.raises(ValueError, match=r"must hold only trainable_tokens_delta \(1, \d+\)"):
        config = lj.LoraConfig(targets=["c_attn"], trainable_tokens={"wte": [1]})
        adapters = lj.init(config, params, jax.random.key(0))
        adapters["transformer/wte/embedding"][lj.TOKENS] = jnp.zeros((2, 3))
        lj.check_adapters(config, params, adapters)


def test_squad_cli_continues_a_trainable_tokens_adapter(tiny_gpt2_dir, tmp_path):
    """`--init-adapter` with trained rows: they keep training and go out in both formats."""
    from train import squad

    _, params = from_pretrained(tiny_gpt2_dir)
    config = lj.LoraConfig(rank=4, alpha=8, targets=["c_attn"], trainable_tokens={"wte": TOKENS})
    start = lj.init(config, params, jax.random.key(0))
    checkpoint.save(tmp_path / "start", config, start, params=params)
    out = tmp_path / "run"
    assert squad.main(cli_args(tiny_gpt2_dir, tiny_squad(tmp_path / "squad.json"), out, "--steps", "2",
                               "--no-base-eval", "--init-adapter", str(tmp_path / "start"))) == 0
    saved = checkpoint.load(out / "adapter", params)
    assert saved.config.trainable_tokens == {"wte": tuple(TOKENS)}
    rows = np.asarray(saved.adapters["transformer/wte/embedding"][lj.TOKENS])
    assert np.abs(rows - np.asarray(start["transformer/wte/embedding"][lj.TOKENS])).max() > 1e-4
    assert json.loads((out / "peft" / lp.CONFIG_FILE).read_text())["trainable_token_indices"] == TOKENS
