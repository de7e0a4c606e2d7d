"""PEFT interop against real torch + peft: export, import, merged export, file safety, size."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from lora_jax import peft as lp
from lora_jax.checkpoint import update_params
from lora_jax.models import BloomConfig, from_pretrained

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

IDS = np.array([[5, 17, 42, 99, 3, 250, 7, 12], [1, 2, 3, 4, 5, 6, 7, 300]], np.int32)
ATOL = 1e-4

# GPT-2 unrolled with per-module rank/alpha, lora_only biases and saved modules (the position
# table among them: an embedding, not the tied head); BLOOM with scanned layers (stacked
# adapters), rsLoRA and every bias trained.
CASES = {
    "gpt2": dict(scan=False, config=lj.LoraConfig(
        rank=4, alpha=8, targets=["c_attn", "c_proj"], rank_pattern={".*mlp/c_proj": 2},
        alpha_pattern={".*h/1/attn/c_attn": 16.0}, bias="lora_only", trainable=["ln_f", "wpe"])),
    "bloom": dict(scan=True, config=lj.LoraConfig(
        rank=4, alpha=8, targets=["query_key_value", "dense_4h_to_h"], use_rslora=True, bias="all")),
}


def hf_model(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(IDS, dtype=torch.long)).logits.numpy()


def train(model, params, config, steps=3):
    """A few real Adam steps on a next-token loss, so B != 0 and the extras move."""
    g = lj.apply(model.apply, config)

    def loss_fn(params, adapters, ids):
        logits = g(params, adapters, ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    ts = lj.make_train_step(loss_fn, optax.adam(1e-2))
    trainable, frozen = lj.split(config, params, lj.init(config, params, jax.random.key(0)))
    opt, step = ts.init(trainable), jax.jit(ts.step)
    for _ in range(steps):
        trainable, opt, _ = step(trainable, frozen, opt, IDS)
    return lj.join(trainable, frozen)


@pytest.fixture(scope="module", params=sorted(CASES))
def trained(request, tiny_gpt2_dir, tiny_bloom_dir):
    name = request.param
    case = CASES[name]
    base_dir = {"gpt2": tiny_gpt2_dir, "bloom": tiny_bloom_dir}[name]
    model, params = from_pretrained(base_dir, scan_layers=case["scan"])
    params, adapters = train(model, params, case["config"])
    assert all(float(jnp.abs(ab["lora_B"]).min(axis=-1).max()) > 0 for ab in adapters.values())
    logits = np.asarray(lj.apply(model.apply, case["config"])(params, adapters, IDS))
    return dict(name=name, base_dir=base_dir, model=model, params=params, adapters=adapters,
                config=case["config"], logits=logits)


def test_export_loads_in_peft(trained, tmp_path):
    t = trained
    out = lp.save_peft(tmp_path / "adapter", t["config"], t["adapters"], model_config=t["model"].config,
                       params=t["params"], base_model_name_or_path=str(t["base_dir"]))
    cfg = json.loads((out / lp.CONFIG_FILE).read_text())
    assert cfg["fan_in_fan_out"] is (t["name"] == "gpt2")
    short = ["c_attn", "c_proj"] if t["name"] == "gpt2" else ["dense_4h_to_h", "query_key_value"]
    assert cfg["target_modules"] == short
    state = lp.read_tensors(out / lp.WEIGHTS_FILE)
    d = t["model"].config.hidden_size
    if t["name"] == "gpt2":
        assert state["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (4, d)
        assert state["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (3 * d, 4)
        assert state["base_model.model.transformer.h.1.mlp.c_proj.lora_A.weight"].shape == (2, 4 * d)
        assert "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias" in state
        assert cfg["modules_to_save"] == ["transformer.ln_f", "transformer.wpe"]
    else:  # stacked [L, ...] adapters come out per layer
        qkv = "base_model.model.transformer.h.1.self_attention.query_key_value"
        assert state[f"{qkv}.lora_B.weight"].shape == (3 * d, 4)
        assert "base_model.model.transformer.h.1.mlp.dense_h_to_4h.bias" in state
    from safetensors import safe_open
    with safe_open(out / lp.WEIGHTS_FILE, "np") as f:
        assert f.metadata() == {"format": "pt"}

    pm = peft.PeftModel.from_pretrained(hf_model(t["base_dir"]), str(out)).eval()
    np.testing.assert_allclose(torch_logits(pm), t["logits"], atol=ATOL, rtol=0)
    # Sanity: the adapter matters, so the comparison above is not vacuous.
    assert np.abs(torch_logits(hf_model(t["base_dir"])) - t["logits"]).max() > 100 * ATOL

    # And back: our own export imports to the same adapters and extras.
    got = lp.load_peft(out, t["params"], model_config=t["model"].config)
    for p, ab in t["adapters"].items():
        assert np.isclose(got.config.scale_for(p), t["config"].scale_for(p)), p
        for k in ab:
            np.testing.assert_allclose(got.adapters[p][k], ab[k], atol=1e-6, err_msg=p)
    g = lj.apply(t["model"].apply, got.config)
    np.testing.assert_allclose(g(update_params(t["params"], got.extras), got.adapters, IDS), t["logits"], atol=ATOL)


def test_merged_export_loads_in_transformers(trained, tmp_path):
    t = trained
    out = lp.save_merged(tmp_path / "merged", t["model"].config, t["params"], t["config"], t["adapters"])
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    np.testing.assert_allclose(torch_logits(hf_model(out)), t["logits"], atol=ATOL, rtol=0)


def _random_peft_model(name, base_dir, nudge):
    """A PEFT model with rank/alpha patterns, random nonzero B, trained biases and saved modules."""
    targets = {"gpt2": ["c_attn", "c_fc"], "bloom": ["query_key_value", "dense_h_to_4h"]}[name]
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, rank_pattern={targets[1]: 2},
        alpha_pattern={f"h.1.{'attn' if name == 'gpt2' else 'self_attention'}.{targets[0]}": 32},
        bias="lora_only", modules_to_save=["ln_f"], task_type="CAUSAL_LM",
    )
    # lora_B (zero at init), lora_A, targeted biases, the ln_f copy: all nonzero and moved
    return nudge(peft.get_peft_model(hf_model(base_dir), cfg), seed=1)


@pytest.mark.parametrize("name,scan", [("gpt2", True), ("bloom", False)])
def test_peft_made_adapter_imports(name, scan, tiny_gpt2_dir, tiny_bloom_dir, tmp_path, nudge_torch):
    base_dir = {"gpt2": tiny_gpt2_dir, "bloom": tiny_bloom_dir}[name]
    pm = _random_peft_model(name, base_dir, nudge_torch)
    pm.save_pretrained(tmp_path / "adapter")
    want = torch_logits(pm)

    model, params = from_pretrained(base_dir, scan_layers=scan)
    got = lp.load_peft(tmp_path / "adapter", params, model_config=model.config)
    assert got.config.bias == "lora_only" and got.config.trainable == ("ln_f",)
    assert sorted(got.extras)[-1] == "transformer/ln_f/scale"
    logits = lj.apply(model.apply, got.config)(update_params(params, got.extras), got.adapters, IDS)
    np.testing.assert_allclose(np.asarray(logits), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["gpt2", "bloom"])
def test_peft_files_a_tied_head_cannot_hold_are_refused(name, tiny_gpt2_dir, tiny_bloom_dir, tmp_path):
    """PEFT adapters whose head differs from the lookup, which lora_jax's tied models cannot
    represent: the table trained in full (modules_to_save: PEFT's copy serves the lookup alone)
    and a LoRA on lm_head. Each is refused, naming what the file holds."""
    base_dir = {"gpt2": tiny_gpt2_dir, "bloom": tiny_bloom_dir}[name]
    emb, lin = {"gpt2": ("wte", "c_attn"), "bloom": ("word_embeddings", "query_key_value")}[name]
    model, params = from_pretrained(base_dir)
    cases = {"table": (dict(target_modules=[lin], modules_to_save=[emb]),
                       f"modules_to_save ['{emb}'] trains the embedding table 'transformer.{emb}' in full"),
             "head": (dict(target_modules=[lin, "lm_head"]),
                      "'base_model.model.lm_head.lora_A.weight': a LoRA on lm_head alone")}
    for case, (kw, msg) in cases.items():
        with warnings.catch_warnings():  # PEFT's about a tied layer in the adapter
            warnings.simplefilter("ignore")
            pm = peft.get_peft_model(hf_model(base_dir), peft.LoraConfig(r=2, lora_alpha=4, **kw))
        pm.save_pretrained(tmp_path / case)
        with pytest.raises(ValueError, match=re.escape(msg)):
            lp.load_peft(tmp_path / case, params, model_config=model.config)


@pytest.mark.parametrize("name", ["gpt2", "bloom"])
def test_monteclora_adapter_imports_as_its_inference_lora(name, tiny_gpt2_dir, tiny_bloom_dir, tmp_path, nudge_torch):
    """A PEFT MonteCLoRA adapter (every factor and sampler parameter nonzero) gives PEFT's eval-mode
    logits and merge, where its sampler does not act; the sampler's tensors are dropped with a
    warning that counts them, and the re-export is the plain LoRA PEFT loads to the same logits."""
    from peft.tuners.lora.config import MontecloraConfig

    base_dir = {"gpt2": tiny_gpt2_dir, "bloom": tiny_bloom_dir}[name]
    target = {"gpt2": "c_attn", "bloom": "query_key_value"}[name]
    pm = nudge_torch(peft.get_peft_model(hf_model(base_dir), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=[target], monteclora_config=MontecloraConfig(num_samples=4))), seed=2)
    pm.save_pretrained(tmp_path / "theirs")
    want = torch_logits(pm)
    model, params = from_pretrained(base_dir)
    with pytest.warns(UserWarning, match=r"MonteCLoRA adapter: its sampler \(8 tensors over 2 modules\) perturbs "
                                         "lora_A in training only"):
        got = lp.load_peft(tmp_path / "theirs", params)
    block = "attn" if name == "gpt2" else "self_attention"
    assert got.config.rank == 4 and sorted(got.adapters) == [f"transformer/h/{i}/{block}/{target}/kernel" for i in (0, 1)]
    np.testing.assert_allclose(np.asarray(lj.apply(model.apply, got.config)(params, got.adapters, IDS)), want,
                               atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(model.apply(lj.merge(got.config, jax.tree.map(jnp.array, params),
                                                               got.adapters), IDS)), want, atol=ATOL, rtol=0)
    ours = lp.save_peft(tmp_path / "ours", got.config, got.adapters, model_config=model.config)
    assert "monteclora_config" not in json.loads((ours / lp.CONFIG_FILE).read_text())
    np.testing.assert_allclose(torch_logits(peft.PeftModel.from_pretrained(hf_model(base_dir), str(ours))), want,
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("scan", [False, True])
def test_peft_layers_to_transform_and_exclude_modules_import(scan, tiny_gpt2_dir, tmp_path, nudge_torch):
    """PEFT adapters that skip layers (`layers_to_transform`) or modules (`exclude_modules`) load as
    what their tensors cover; on a scanned base the skipped layers get zero factors."""
    pm = nudge_torch(peft.get_peft_model(hf_model(tiny_gpt2_dir), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"], layers_to_transform=[1], layers_pattern="h",
        exclude_modules=["h.1.attn.c_proj"])), seed=2)
    pm.save_pretrained(tmp_path / "adapter")
    model, params = from_pretrained(tiny_gpt2_dir, scan_layers=scan)
    got = lp.load_peft(tmp_path / "adapter", params, model_config=model.config)
    layer = "" if scan else "1/"
    assert sorted(got.adapters) == [f"transformer/h/{layer}attn/c_attn/kernel",
                                    f"transformer/h/{layer}mlp/c_proj/kernel"]
    if scan:
        assert not np.any(got.adapters["transformer/h/attn/c_attn/kernel"]["lora_A"][0])
    logits = lj.apply(model.apply, got.config)(params, got.adapters, IDS)
    np.testing.assert_allclose(np.asarray(logits), torch_logits(pm), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kw", [dict(target_modules=["transformer.h.1.attn.c_attn", "c_fc"], layers_to_transform=[0]),
                                dict(target_modules=["c_attn"], layers_to_transform=[])], ids=["full-name", "empty"])
def test_peft_layers_to_transform_as_peft_reads_it(kw, tiny_gpt2_dir, tmp_path, nudge_torch):
    """PEFT applies layers_to_transform to suffix matches alone (a module target_modules names in
    full is adapted in any layer) and reads an empty list as every layer: such an adapter loads into
    a scanned base with a config that keeps every layer it adapts, and re-exports to PEFT's logits."""
    pm = nudge_torch(peft.get_peft_model(hf_model(tiny_gpt2_dir), peft.LoraConfig(r=2, lora_alpha=4, **kw)), seed=2)
    pm.save_pretrained(tmp_path / "theirs")
    want = torch_logits(pm)
    model, params = from_pretrained(tiny_gpt2_dir, scan_layers=True)
    got = lp.load_peft(tmp_path / "theirs", params, model_config=model.config)
    assert sorted(lj.target_paths(got.config, params)) == sorted(got.adapters)
    np.testing.assert_allclose(np.asarray(lj.apply(model.apply, got.config)(params, got.adapters, IDS)), want,
                               atol=ATOL, rtol=0)
    ours = lp.save_peft(tmp_path / "ours", got.config, got.adapters, model_config=model.config)
    np.testing.assert_allclose(torch_logits(peft.PeftModel.from_pretrained(hf_model(tiny_gpt2_dir), str(ours))), want,
                               atol=ATOL, rtol=0)


def test_layers_pattern_alternation_exports_as_peft_reads_it(tiny_gpt2_dir, tmp_path):
    """PEFT puts layers_pattern into its regex ungrouped, so an alternation (`h|blocks`), which
    lora_jax reads as one name, finds no layer number there: the export names the adapted modules
    in full, and PEFT gives our logits."""
    model, params = from_pretrained(tiny_gpt2_dir)
    config = lj.LoraConfig(rank=2, alpha=4, targets=["c_attn"], layers_to_transform=[1], layers_pattern="h|blocks")
    adapters = {p: ab | {"lora_B": 0.1 * jax.random.normal(jax.random.key(1), ab["lora_B"].shape)}
                for p, ab in lj.init(config, params, jax.random.key(0)).items()}
    out = lp.save_peft(tmp_path / "ours", config, adapters, model_config=model.config)
    assert json.loads((out / lp.CONFIG_FILE).read_text())["target_modules"] == ["transformer.h.1.attn.c_attn"]
    want = np.asarray(lj.apply(model.apply, config)(params, adapters, IDS))
    np.testing.assert_allclose(torch_logits(peft.PeftModel.from_pretrained(hf_model(tiny_gpt2_dir), str(out))), want,
                               atol=ATOL, rtol=0)


class _CallsOnLoad:
    """Unpickling this calls a function: exactly what weights_only=True must refuse."""

    def __reduce__(self):
        return (print, ("unpickled arbitrary code!",))


def test_damaged_files_raise_naming_the_file(tmp_path):
    d = tmp_path / "a"
    d.mkdir()
    (d / lp.CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    from safetensors.numpy import save_file
    save_file({"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": np.ones((2, 8), np.float32),
               "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": np.ones((24, 2), np.float32)},
              d / lp.WEIGHTS_FILE)
    params = {"transformer": {"h": {"0": {"attn": {"c_attn": {"kernel": np.zeros((8, 24), np.float32)}}}}}}
    assert lp.load_peft(d, params).config.targets == ("transformer/h/0/attn/c_attn",)

    blob = (d / lp.WEIGHTS_FILE).read_bytes()
    (d / lp.WEIGHTS_FILE).write_bytes(blob[:-10])
    with pytest.raises(ValueError, match=f"{d / lp.WEIGHTS_FILE}.*truncated or corrupted"):
        lp.load_peft(d, params)
    (d / lp.WEIGHTS_FILE).unlink()
    # A pickle that is not plain tensors is refused by torch.load(weights_only=True).
    torch.save({"x": torch.ones(2), "evil": _CallsOnLoad()}, d / lp.BIN_FILE)
    with pytest.raises(ValueError, match=f"{d / lp.BIN_FILE}: refused: the pickle holds objects other than tensors"):
        lp.load_peft(d, params)
    (d / lp.CONFIG_FILE).write_text('{"peft_type": "LORA", "r": ')
    with pytest.raises(ValueError, match=f"{d / lp.CONFIG_FILE}.*not valid JSON"):
        lp.load_peft(d, params)


def test_bloom_560m_export_size(tmp_path):
    """The seeds' anchor: r=16 on query_key_value, fp16, BLOOM-560m shapes: ~3 MB."""
    L, d, r = 24, 1024, 16
    config = lj.LoraConfig(rank=r, alpha=32, dropout=0.05, targets=["query_key_value"])
    adapters = {"transformer/h/self_attention/query_key_value/kernel": {  # stacked, as under scan
        "lora_A": np.zeros((L, d, r), np.float32), "lora_B": np.zeros((L, r, 3 * d), np.float32)}}
    out = lp.save_peft(tmp_path / "a", config, adapters, model_config=BloomConfig.preset("bloom-560m"),
                       dtype="float16")
    size = (out / lp.WEIGHTS_FILE).stat().st_size
    payload = L * (r * d + 3 * d * r) * 2  # A (r, in) + B (out, r) per layer, 2 bytes each
    assert payload == 3_145_728
    assert payload < size < 1.1 * payload
    cfg = json.loads((out / lp.CONFIG_FILE).read_text())
    assert cfg["target_modules"] == ["query_key_value"] and cfg["r"] == 16 and cfg["lora_alpha"] == 32
    print(f"BLOOM-560m r=16 qkv fp16 adapter_model.safetensors: {size} bytes")


def _peft_embedding_adapter(base_dir, name, tmp_path, nudge_torch, seed, **lora_kw):
    """A nudged PEFT adapter on the tied embedding and one linear layer, loaded here: (emb, model,
    params, loaded, PEFT's unmerged hidden states, PEFT's merged logits)."""
    emb, lin = {"gpt2": ("wte", "c_fc"), "bloom": ("word_embeddings", "dense_h_to_4h")}[name]
    with warnings.catch_warnings():  # PEFT's on ensure_weight_tying, which it ignores for these names
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(hf_model(base_dir), peft.LoraConfig(r=4, lora_alpha=8, target_modules=[emb, lin],
                                                                      **lora_kw))
    nudge_torch(pm, seed=seed).save_pretrained(tmp_path / "peft_made")
    ids = torch.tensor(IDS, dtype=torch.long)
    with torch.no_grad():
        hidden_want = pm.base_model.model.transformer(ids).last_hidden_state.numpy()
        logits_want = pm.merge_and_unload()(ids).logits.numpy()
    model, params = from_pretrained(base_dir)
    with pytest.warns(UserWarning, match="tied LM head"):
        got = lp.load_peft(tmp_path / "peft_made", params, model_config=model.config)
    return emb, model, params, got, hidden_want, logits_want


@pytest.mark.parametrize("name", ["gpt2", "bloom"])
def test_dora_on_the_embedding_matches_peft_both_ways(name, tiny_gpt2_dir, tiny_bloom_dir, tmp_path, nudge_torch):
    """DoRA on the tied embedding (PEFT's DoraEmbeddingLayer: the norms over the vocabulary, one per
    feature): PEFT's unmerged hidden states and merged logits, factored in the lookup and the
    tied head (strict), the magnitude both ways, merge = lazy, and a gradient for the magnitude."""
    base_dir = {"gpt2": tiny_gpt2_dir, "bloom": tiny_bloom_dir}[name]
    # ensure_weight_tying: PEFT's unmerged model still adapts the lookup alone; the import warns of it too
    emb, model, params, got, hidden_want, logits_want = _peft_embedding_adapter(base_dir, name, tmp_path, nudge_torch,
                                                                                4, use_dora=True,
                                                                                ensure_weight_tying=True)
    ids = torch.tensor(IDS, dtype=torch.long)
    path = f"transformer/{emb}/embedding"
    assert got.config.use_dora and got.adapters[path][lj.MAGNITUDE].shape == (model.config.hidden_size,)
    g = lj.apply(model.apply, got.config, strict=True)
    np.testing.assert_allclose(g(params, got.adapters, IDS, return_hidden=True), hidden_want, atol=ATOL, rtol=0)
    logits = np.asarray(g(params, got.adapters, IDS))
    np.testing.assert_allclose(logits, logits_want, atol=ATOL, rtol=0)
    merged = lj.merge(got.config, jax.tree.map(jnp.array, params), got.adapters)
    np.testing.assert_allclose(np.asarray(model.apply(merged, IDS)), logits, atol=ATOL, rtol=0)

    with pytest.warns(UserWarning, match="unmerged model applies it to the lookup only"):
        out = lp.save_peft(tmp_path / "ours", got.config, got.adapters, model_config=model.config)
    with torch.no_grad():
        back = peft.PeftModel.from_pretrained(hf_model(base_dir), str(out)).eval()
        np.testing.assert_allclose(back.base_model.model.transformer(ids).last_hidden_state.numpy(), hidden_want,
                                   atol=ATOL, rtol=0)
    grad = jax.grad(lambda a: g(params, a, IDS).astype(jnp.float32).std())(got.adapters)
    assert np.abs(np.asarray(grad[path][lj.MAGNITUDE])).max() > 0


@pytest.mark.parametrize("name", ["gpt2", "bloom"])
def test_embedding_lora_matches_peft_both_ways(name, tiny_gpt2_dir, tiny_bloom_dir, tmp_path, nudge_torch):
    """LoRA on the tied embedding: PEFT's lora_embedding_A/B tensors in and out. lora_jax applies
    W0 + s*A*B in the lookup and the tied head: PEFT's unmerged model matches it up to the head,
    its merged model in full; lazy generation and the answer-only loss use the adapted head too."""
    from lora_jax.models import generate
    from train.loop import target_loss

    base_dir = {"gpt2": tiny_gpt2_dir, "bloom": tiny_bloom_dir}[name]
    emb, model, params, got, hidden_want, logits_want = _peft_embedding_adapter(base_dir, name, tmp_path, nudge_torch,
                                                                                2, init_lora_weights="gaussian")
    ids = torch.tensor(IDS, dtype=torch.long)
    path = f"transformer/{emb}/embedding"
    V, D = model.config.vocab_size, model.config.hidden_size
    assert got.adapters[path]["lora_A"].shape == (V, 4) and got.adapters[path]["lora_B"].shape == (4, D)
    g = lj.apply(model.apply, got.config, strict=True)  # strict: the lookup and head stay factored
    np.testing.assert_allclose(g(params, got.adapters, IDS, return_hidden=True), hidden_want, atol=ATOL, rtol=0)
    logits = np.asarray(g(params, got.adapters, IDS))
    np.testing.assert_allclose(logits, logits_want, atol=ATOL, rtol=0)
    assert np.abs(np.asarray(model.apply(params, IDS)) - logits).max() > 100 * ATOL

    # Our export: PEFT's tensor names (nothing missing on load), no ensure_weight_tying (PEFT ties
    # embed_tokens / lm_head alone), and a warning that PEFT's unmerged model adapts the lookup alone.
    with pytest.warns(UserWarning, match="unmerged model applies it to the lookup only"):
        out = lp.save_peft(tmp_path / "ours", got.config, got.adapters, model_config=model.config)
    state = lp.read_tensors(out / lp.WEIGHTS_FILE)
    assert state[f"base_model.model.transformer.{emb}.lora_embedding_A"].shape == (4, V)
    assert state[f"base_model.model.transformer.{emb}.lora_embedding_B"].shape == (D, 4)
    assert "ensure_weight_tying" not in json.loads((out / lp.CONFIG_FILE).read_text())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        back = peft.PeftModel.from_pretrained(hf_model(base_dir), str(out)).eval()
    assert not [w for w in record if "missing adapter keys" in str(w.message) or "ensure_weight" in str(w.message)]
    with torch.no_grad():
        hidden_back = back.base_model.model.transformer(ids).last_hidden_state.numpy()
        np.testing.assert_allclose(back.merge_and_unload()(ids).logits.numpy(), logits, atol=ATOL, rtol=0)
    np.testing.assert_allclose(hidden_back, hidden_want, atol=ATOL, rtol=0)
    with pytest.warns(UserWarning, match="tied LM head"):
        again = lp.load_peft(out, params, model_config=model.config)
    for k in ("lora_A", "lora_B"):
        np.testing.assert_allclose(again.adapters[path][k], got.adapters[path][k], atol=1e-6)

    # Generation and the answer-only loss see the adapted head (logits via `positions`).
    lazy = lambda p, *a, **k: g(p, got.adapters, *a, **k)  # noqa: E731
    merged = lj.merge(got.config, jax.tree.map(jnp.array, params), got.adapters)
    kw = dict(model=model, max_new_tokens=4, eos_token_id=None)
    np.testing.assert_array_equal(generate(lazy, params, IDS, None, **kw), generate(model.apply, merged, IDS, None, **kw))
    batch = dict(input_ids=IDS, attention_mask=np.ones_like(IDS), labels=np.roll(IDS, -1, axis=1),
                 loss_mask=np.pad(np.ones((2, 3), np.float32), ((0, 0), (5, 0))))  # the last 3 tokens
    loss = target_loss(lambda p, a, ids, m, rng, pos: g(p, a, ids, m, positions=pos), targets=3)
    total, n = loss(params, got.adapters, batch, None)
    full = jax.nn.log_softmax(logits.astype(np.float32), axis=-1)
    want = -np.take_along_axis(np.asarray(full), batch["labels"][..., None], axis=-1)[:, 5:, 0].sum()
    assert n == 6 and np.isclose(float(total), float(want), rtol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "bloom"])
def test_all_linear_selects_what_peft_selects(name, tiny_gpt2_dir, tiny_bloom_dir, tmp_path):
    """targets="all-linear" adapts the modules PEFT's "all-linear" adapts (every layer matmul, not
    the tied head), on unrolled and scanned params; PEFT's file (it lists the modules) imports."""
    base_dir = {"gpt2": tiny_gpt2_dir, "bloom": tiny_bloom_dir}[name]
    pm = peft.get_peft_model(hf_model(base_dir), peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    want = sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules() if hasattr(m, "lora_A")
                  and "default" in m.lora_A)
    config = lj.LoraConfig(rank=2, alpha=4, targets="all-linear")
    model, params = from_pretrained(base_dir)
    got = sorted(p.rsplit("/", 1)[0].replace("/", ".") for p in lj.target_paths(config, params))
    assert got == want and len(got) == 4 * model.config.num_layers
    _, scanned = from_pretrained(base_dir, scan_layers=True)
    assert len(lj.target_paths(config, scanned)) == 4  # one stacked [L, in, out] kernel per matmul
    assert lj.LoraConfig(targets=["all-linear"]).targets == "all-linear"  # as `--targets all-linear` gives it
    pm.save_pretrained(tmp_path / "adapter")
    back = lp.load_peft(tmp_path / "adapter", params, model_config=model.config)
    assert sorted(back.adapters) == sorted(lj.target_paths(config, params))


def test_adapter_by_hub_id_from_the_cache(tiny_gpt2_dir, tmp_path, monkeypatch):
    """A hub id (PeftModel.from_pretrained(model, "org/adapter")) resolves through the Hugging Face
    cache layout, offline; a missing one is a FileNotFoundError naming it."""
    model, params = from_pretrained(tiny_gpt2_dir)
    config = lj.LoraConfig(rank=2, alpha=4, targets=["c_attn"])
    adapters = jax.tree.map(lambda x: x + 0.1, lj.init(config, params, jax.random.key(0)))
    rev = "89abcdef0123456789abcdef0123456789abcdef"
    repo = tmp_path / "hub" / "models--some-org--tiny-adapter"
    lp.save_peft(repo / "snapshots" / rev, config, adapters, model_config=model.config, revision="v1.0")
    assert peft.LoraConfig.from_pretrained(repo / "snapshots" / rev).revision == "v1.0"  # the base model's
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for got in (lp.load_peft("some-org/tiny-adapter", params), lp.load_adapter("some-org/tiny-adapter", params),
                lp.load_adapter("some-org/tiny-adapter", params, revision=rev)):
        assert got.config.targets == ("c_attn",) and got.base_model_revision == "v1.0"
        for p, ab in adapters.items():
            np.testing.assert_allclose(got.adapters[p]["lora_B"], ab["lora_B"], atol=1e-7)
    with pytest.raises(FileNotFoundError, match="some-org/missing"):
        lp.load_adapter("some-org/missing", params)
    with pytest.raises(FileNotFoundError, match="'some-org/tiny-adapter' at revision 'v9'"):
        lp.load_peft("some-org/tiny-adapter", params, revision="v9")


@pytest.mark.parametrize("name,scan", [("gpt2", True), ("bloom", False)])
def test_dora_matches_peft_both_ways(name, scan, tiny_gpt2_dir, tiny_bloom_dir, tmp_path, nudge_torch):
    """A PEFT DoRA adapter (use_dora, lora_magnitude_vector) imports onto unrolled or scanned
    params with PEFT's logits, factored throughout; our export loads in PEFT with the same logits;
    the merged checkpoint and an orbax round trip agree."""
    from lora_jax import checkpoint

    base_dir = {"gpt2": tiny_gpt2_dir, "bloom": tiny_bloom_dir}[name]
    targets = {"gpt2": ["c_attn", "c_fc"], "bloom": ["query_key_value", "dense_h_to_4h"]}[name]
    pm = peft.get_peft_model(hf_model(base_dir), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, rank_pattern={targets[1]: 2}, use_dora=True))
    nudge_torch(pm, seed=3).save_pretrained(tmp_path / "peft_made")  # lora_A, lora_B, lora_magnitude_vector
    want = torch_logits(pm)

    model, params = from_pretrained(base_dir, scan_layers=scan)
    got = lp.load_peft(tmp_path / "peft_made", params, model_config=model.config)
    assert got.config.use_dora and all(lj.MAGNITUDE in ab for ab in got.adapters.values())
    g = lj.apply(model.apply, got.config, strict=True)
    logits = np.asarray(g(params, got.adapters, IDS))
    np.testing.assert_allclose(logits, want, atol=ATOL, rtol=0)
    assert np.abs(np.asarray(model.apply(params, IDS)) - want).max() > 100 * ATOL

    out = lp.save_peft(tmp_path / "ours", got.config, got.adapters, model_config=model.config)
    assert json.loads((out / lp.CONFIG_FILE).read_text())["use_dora"] is True
    np.testing.assert_allclose(torch_logits(peft.PeftModel.from_pretrained(hf_model(base_dir), str(out)).eval()),
                               want, atol=ATOL, rtol=0)
    merged = lp.save_merged(tmp_path / "merged", model.config, params, got.config, got.adapters)
    np.testing.assert_allclose(torch_logits(hf_model(merged)), want, atol=ATOL, rtol=0)
    ck = checkpoint.load(checkpoint.save(tmp_path / "orbax", got.config, got.adapters, params=params), params)
    np.testing.assert_allclose(g(params, ck.adapters, IDS), logits, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="use_dora=False in the config but a lora_magnitude_vector"):
        cfg = json.loads((out / lp.CONFIG_FILE).read_text())
        (out / lp.CONFIG_FILE).write_text(json.dumps(cfg | {"use_dora": False}))
        lp.load_peft(out, params, model_config=model.config)


@pytest.mark.parametrize("name,init,scan,dora", [("gpt2", "pissa", True, False), ("bloom", "pissa", False, True),
                                                 ("bloom", "olora", True, False)])
def test_residual_inits_match_peft(name, init, scan, dora, tiny_gpt2_dir, tiny_bloom_dir, tmp_path):
    """PiSSA / OLoRA as PEFT makes them (init_lora_weights=...): the same residual model (PEFT's
    base with the adapter disabled), the same initial delta s*B*A per module and DoRA magnitude;
    trained adapters, through to_plain, load in PEFT on the stock base with our logits on the
    residual weights. (OLoRA only on BLOOM: PEFT's OLoRA ignores GPT-2's fan_in_fan_out.)"""
    import dataclasses

    from peft.utils import get_peft_model_state_dict

    base_dir = {"gpt2": tiny_gpt2_dir, "bloom": tiny_bloom_dir}[name]
    targets = {"gpt2": ["c_attn", "c_fc"], "bloom": ["query_key_value", "dense_h_to_4h"]}[name]
    pm = peft.get_peft_model(hf_model(base_dir), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init, use_dora=dora)).eval()
    with torch.no_grad(), pm.disable_adapter():
        peft_residual = pm(torch.tensor(IDS, dtype=torch.long)).logits.numpy()
    peft_init = {k: v.detach().numpy() for k, v in get_peft_model_state_dict(pm).items()}

    model, params = from_pretrained(base_dir, scan_layers=scan)
    config = lj.LoraConfig(rank=4, alpha=8, targets=targets, init=init, use_dora=dora)
    params_res, a0 = lj.init_residual(config, params, jax.random.key(0))
    # Two fp32 SVDs (torch's LAPACK, XLA's) agree on the top-r subspace to ~eps * sigma_1 / gap: one
    # BLOOM layer here has sigma_4 - sigma_5 = 0.012, and its residual weights differ by 7e-5.
    np.testing.assert_allclose(model.apply(params_res, IDS), peft_residual, atol=5 * ATOL, rtol=0)
    ours = lp.peft_state_dict(dataclasses.replace(config, init="kaiming_uniform"), a0, model_config=model.config)
    assert set(ours) == set(peft_init)
    for k in (k for k in ours if ".lora_A." in k):
        b = k.replace(".lora_A.", ".lora_B.")  # each factor is unique only up to signs: compare B*A
        np.testing.assert_allclose(ours[b] @ ours[k], peft_init[b] @ peft_init[k], atol=1e-4, err_msg=k)
    for k in (k for k in ours if lj.MAGNITUDE in k):
        np.testing.assert_allclose(ours[k], peft_init[k], rtol=1e-5, err_msg=k)

    trained = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape), a0)
    want = np.asarray(lj.apply(model.apply, config, strict=True)(params_res, trained, IDS))
    plain_config, plain = lj.to_plain(config, trained, a0)
    out = lp.save_peft(tmp_path / "plain", plain_config, plain, model_config=model.config)
    cfg = json.loads((out / lp.CONFIG_FILE).read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and cfg["init_lora_weights"] is True
    got = torch_logits(peft.PeftModel.from_pretrained(hf_model(base_dir), str(out)).eval())
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    assert np.abs(got - np.asarray(model.apply(params, IDS))).max() > 100 * ATOL


def test_orthogonal_init_like_peft(tiny_gpt2_dir, tmp_path):
    """PEFT's `orthogonal` init: A and B random on orthogonal halves of a rotation, A B = 0; the
    same factor scales as PEFT draws, and the name survives a PEFT round trip."""
    torch.manual_seed(0)  # PEFT draws from torch's global generator, which other tests on this worker move
    pm = peft.get_peft_model(hf_model(tiny_gpt2_dir), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["c_fc"],
                                                                       init_lora_weights="orthogonal"))
    pm.save_pretrained(tmp_path / "peft_made")
    theirs = {k: v.detach().numpy() for k, v in pm.state_dict().items() if "lora_" in k}
    model, params = from_pretrained(tiny_gpt2_dir, scan_layers=True)
    config = lj.LoraConfig(rank=8, alpha=16, targets=["c_fc", "c_attn"], rank_pattern={".*c_attn": 4},
                           init="orthogonal")
    adapters = lj.init(config, params, jax.random.key(0))
    for p, ab in adapters.items():
        a, b = np.asarray(ab["lora_A"]), np.asarray(ab["lora_B"])  # [L, in, r], [L, r, out]
        r = a.shape[-1]
        assert np.abs(a @ b).max() < 1e-6 and np.abs(a).min(axis=(1, 2)).max() > 0 and np.abs(b).max() > 0.01
        assert all(np.linalg.matrix_rank(m) == r // 2 for m in a)  # A = R1 Q_odd: rank r/2
    assert adapters["transformer/h/attn/c_attn/kernel"]["lora_A"].shape[-1] == 4
    fc = adapters["transformer/h/mlp/c_fc/kernel"]
    for ours, key in ((fc["lora_A"], "lora_A"), (fc["lora_B"], "lora_B")):
        # Each entry: r/2 unit-variance normals times a column of half an r x r rotation, / 10, so the
        # expected square is (1/100) * (r/2) / r; both draws (512 entries, rank-4 blocks) land near it.
        want, peft_std = 0.1 / np.sqrt(2), np.std([v for k, v in theirs.items() if f"{key}." in k])
        assert abs(float(jnp.std(ours)) / want - 1) < 0.15 and abs(peft_std / want - 1) < 0.15, key
    np.testing.assert_allclose(lj.apply(model.apply, config)(params, adapters, IDS), model.apply(params, IDS),
                               atol=1e-5)
    with pytest.raises(ValueError, match=r"init='orthogonal' needs an even rank; .*c_attn/kernel' has rank 3"):
        lj.init(dataclasses.replace(config, rank_pattern={".*c_attn": 3}), params, jax.random.key(0))
    assert lp.load_peft(tmp_path / "peft_made", from_pretrained(tiny_gpt2_dir)[1]).config.init == "orthogonal"
    out = lp.save_peft(tmp_path / "ours", config, adapters, model_config=model.config)
    assert json.loads((out / lp.CONFIG_FILE).read_text())["init_lora_weights"] is True


def test_lorafa_matches_peft(tiny_gpt2_dir, tmp_path, monkeypatch, peft_train):
    """LoRA-FA against PEFT's create_lorafa_optimizer: three steps on the same next-token loss give the
    same lora_B, lora_A untouched. (Both in fp32: PEFT's bf16 autocast of the projection is turned
    off; Adam's eps to 1e-12 on both sides, since HF's AdamW adds eps before the bias correction.)"""
    from peft.optimizers import create_lorafa_optimizer
    from peft.optimizers import lorafa as peft_lorafa

    monkeypatch.setattr(peft_lorafa, "is_bf16_available", lambda *a, **k: False)
    model, params = from_pretrained(tiny_gpt2_dir)
    config = lj.LoraConfig(rank=4, alpha=8, targets=["c_attn", "c_fc"], use_rslora=True,
                           rank_pattern={".*c_fc": 2})  # per-module scales
    start = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape),
                         lj.init(config, params, jax.random.key(0)))
    out = lp.save_peft(tmp_path / "start", config, start, model_config=model.config)
    pm = peft.PeftModel.from_pretrained(hf_model(tiny_gpt2_dir), str(out), is_trainable=True).eval()
    opt = create_lorafa_optimizer(pm, r=4, lora_alpha=8, lr=1e-2)
    opt.param_groups[0]["eps"] = 1e-12
    theirs = peft_train(pm, opt, IDS)

    g = lj.apply(model.apply, config)
    ts = lj.make_train_step(lambda p, a, x: optax.softmax_cross_entropy_with_integer_labels(
        g(p, a, x)[:, :-1], x[:, 1:]).mean(), lj.lorafa(config, optax.adam(1e-2, eps=1e-12)))
    trainable, frozen = lj.split(config, params, start)
    opt_state, step = ts.init(trainable), jax.jit(ts.step)
    for _ in range(3):
        trainable, opt_state, _ = step(trainable, frozen, opt_state, IDS)
    ours = lp.peft_state_dict(config, trainable["adapters"], model_config=model.config)
    begin = lp.peft_state_dict(config, start, model_config=model.config)
    assert set(ours) == set(theirs)
    for k in ours:
        if ".lora_A." in k:
            np.testing.assert_array_equal(ours[k], begin[k])
            np.testing.assert_allclose(theirs[k], begin[k], atol=1e-7, err_msg=k)
        else:
            assert np.abs(ours[k] - begin[k]).max() > 1e-3, k
            np.testing.assert_allclose(ours[k], theirs[k], atol=1e-5, rtol=0, err_msg=k)
