"""AdaLoRA (PEFT's AdaLoraConfig): PEFT's outputs, gradients and orthogonal regulariser both ways
through its files, its rank allocation step by step, conversion to plain LoRA, the orbax round
trip and the refusals."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from lora_jax import adalora, checkpoint, multi
from lora_jax import peft as lp
from lora_jax.models import from_pretrained

IDS = np.array([[5, 9, 17, 33, 2, 7], [40, 41, 42, 3, 3, 3]])
TARGETS = {"gpt2": ["c_attn", "c_fc"], "bloom": ["query_key_value", "dense_4h_to_h"]}


def _hf(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager")


def _peft_config(name, **kw):
    import peft

    return peft.AdaLoraConfig(task_type="CAUSAL_LM", init_r=4, target_r=2, lora_alpha=8, target_modules=TARGETS[name],
                              **({"total_step": 10, "tinit": 2, "tfinal": 3} | kw))


def _peft_orth(pm, ids):
    """PEFT's orthogonal regulariser: its loss with labels minus the wrapped model's own loss."""
    import torch

    x = torch.tensor(ids, dtype=torch.long)
    return float((pm(input_ids=x, labels=x).loss - pm.base_model.model(input_ids=x, labels=x).loss).detach())


@pytest.mark.parametrize("name,scan", [("gpt2", False), ("bloom", True)])
def test_matches_peft_both_ways(name, scan, tiny_gpt2_dir, tiny_bloom_dir, tmp_path, nudge_torch, peft_grads):
    """A PEFT AdaLoRA adapter (E nonzero, some triplets pruned by its rank_pattern) gives PEFT's
    logits, gradients and orthogonal regulariser, merged too; our export of it loads back into
    PEFT, pruned triplets dropped, with the same logits, and so does its plain-LoRA form (to_lora)."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    directory = {"gpt2": tiny_gpt2_dir, "bloom": tiny_bloom_dir}[name]
    pm = nudge_torch(peft.get_peft_model(_hf(directory), _peft_config(name)), seed=3)
    first = next(m for m in pm.modules() if hasattr(m, "lora_E") and m.lora_E)
    with torch.no_grad():
        first.lora_E["default"][1:3] = 0.0  # pruned by hand: PEFT's rank_pattern then drops them
    pattern = {n.removeprefix("base_model.model.").replace(".default", ""): (p.detach()[:, 0] != 0).tolist()
               for n, p in pm.named_parameters() if ".lora_E." in n}
    pm.peft_config["default"].rank_pattern = pattern
    pm.save_pretrained(tmp_path / "theirs")
    want = pm(torch.tensor(IDS)).logits.detach().numpy()
    loaded = peft.PeftModel.from_pretrained(_hf(directory), str(tmp_path / "theirs"), is_trainable=True).eval()
    want_orth = _peft_orth(loaded, IDS)  # on PEFT's loaded modules, which hold the kept triplets alone
    want_grads = peft_grads(pm, IDS)

    model, params = from_pretrained(directory, scan_layers=scan)
    got = lp.load_peft(tmp_path / "theirs", params)
    config = got.config
    assert config.rank == 4 and config.adalora == lj.AdaLoraSchedule(target_r=2, total_step=10, tinit=2, tfinal=3)
    assert config.scale_for("x") == pytest.approx(8 / (4 + 1e-5), rel=1e-12)
    assert sorted(int(k.sum()) for k in adalora.kept(got.adapters).values() for k in np.atleast_2d(k)) == \
        sorted(sum(v) for v in pattern.values())
    g = lj.apply(model.apply, config, strict=True)
    np.testing.assert_allclose(g(params, got.adapters, IDS), want, atol=2e-5)
    np.testing.assert_allclose(adalora.orth_loss(config, got.adapters), want_orth, rtol=1e-4)
    merged = lj.merge(config, jax.tree.map(jnp.array, params), got.adapters)
    np.testing.assert_allclose(model.apply(merged, IDS), want, atol=2e-5)

    grads = jax.grad(lambda a: (g(params, a, IDS) ** 2).mean())(got.adapters)
    for p, ab in want_grads.items():
        q = p.replace("/h/0/", "/h/").replace("/h/1/", "/h/") if scan else p
        q = q if q in grads else q.replace("/kernel", "/weight")
        i = int(p.split("/h/")[1].split("/")[0])
        keep = np.flatnonzero(pattern[p.removesuffix("/kernel").replace("/", ".") + ".lora_E"])
        for k, v in ab.items():  # the kept triplets (ours has zeros where PEFT's file had none)
            ours = np.asarray(grads[q][k][i] if scan else grads[q][k])
            pick = (lambda x: x[:, keep]) if k == "lora_A" else (lambda x: x.reshape(4, -1)[keep])
            np.testing.assert_allclose(pick(ours), pick(v), atol=1e-5, rtol=1e-4, err_msg=f"{p} {k}")

    out = lp.save_peft(tmp_path / "ours", config, got.adapters, model_config=model.config)
    cfg = json.loads((out / lp.CONFIG_FILE).read_text())
    assert (cfg["peft_type"], cfg["init_r"], cfg["target_r"], cfg["rank_pattern"]) == ("ADALORA", 4, 2, pattern)
    back = peft.PeftModel.from_pretrained(_hf(directory), str(out)).eval()
    np.testing.assert_allclose(back(torch.tensor(IDS)).logits.detach().numpy(), want, atol=2e-5)
    plain_cfg, plain = adalora.to_lora(config, got.adapters)  # and as a plain PEFT LoRA file
    out = lp.save_peft(tmp_path / "plain", plain_cfg, plain, model_config=model.config)
    assert json.loads((out / lp.CONFIG_FILE).read_text())["peft_type"] == "LORA"
    back = peft.PeftModel.from_pretrained(_hf(directory), str(out)).eval()
    np.testing.assert_allclose(back(torch.tensor(IDS)).logits.detach().numpy(), want, atol=2e-5)


def test_rank_allocation_matches_peft(tiny_gpt2_dir, tmp_path):
    """Ten SGD steps of PEFT's AdaLoRA loop (loss with its orthogonal regulariser, then
    update_and_allocate(i)) and of rank_allocator on the same loss, from the same start: the same
    triplets pruned at every step (the warm-up, the cubic budget, the final allocation held) and
    the same weights; an export of the result holds PEFT's rank_pattern and tensors."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    pm = peft.get_peft_model(_hf(tiny_gpt2_dir), _peft_config("gpt2")).eval()  # eval: no dropout
    pm.save_pretrained(tmp_path / "start")
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    x = torch.tensor(IDS, dtype=torch.long)
    theirs = []
    for i in range(10):
        pm(input_ids=x, labels=x).loss.backward()
        opt.step()
        pm.base_model.update_and_allocate(i)
        opt.zero_grad()
        theirs.append({n.removeprefix("base_model.model."): int((m.lora_E["default"] != 0).sum())
                       for n, m in pm.named_modules() if hasattr(m, "lora_E") and m.lora_E})
    want_state = {k: v.detach().numpy() for k, v in get_peft_model_state_dict(pm).items()}

    model, params = from_pretrained(tiny_gpt2_dir)
    start = lp.load_peft(tmp_path / "start", params)
    config, adapters = start.config, start.adapters
    g = lj.apply(model.apply, config)

    def loss(a):
        logp = jax.nn.log_softmax(g(params, a, IDS)[:, :-1])
        nll = -jnp.take_along_axis(logp, IDS[:, 1:, None], -1).mean()
        return nll + adalora.orth_loss(config, a)

    tx = adalora.rank_allocator(config, optax.sgd(0.5))
    state = tx.init(adapters)

    @jax.jit
    def step(a, s):
        updates, s = tx.update(jax.grad(loss)(a), s, a)
        return optax.apply_updates(a, updates), s

    ours = []
    for _ in range(10):
        adapters, state = step(adapters, state)
        ours.append({p.removesuffix("/kernel").replace("/", "."): int(k.sum())
                     for p, k in adalora.kept(adapters).items()})
    assert ours == theirs
    total = [sum(t.values()) for t in theirs]
    assert total[2] == 16 and total[4] < total[3] < 16 and total[-1] == 2 * 4 and len(set(theirs[-1].values())) > 1
    assert int(state.count) == 10

    out = lp.save_peft(tmp_path / "ours", config, adapters, model_config=model.config)
    got = lp.read_tensors(out / lp.WEIGHTS_FILE)
    assert set(got) == set(want_state)
    for k, v in want_state.items():
        np.testing.assert_allclose(got[k], v, atol=2e-5, err_msg=k)
    want_cfg = json.loads((tmp_path / "start" / lp.CONFIG_FILE).read_text())
    assert json.loads((out / lp.CONFIG_FILE).read_text())["rank_pattern"] == {
        k.replace(".default", ""): v for k, v in pm.peft_config["default"].rank_pattern.items()}
    assert want_cfg["peft_type"] == "ADALORA"


def test_budget_schedule_matches_peft():
    """The budget and pruning steps of PEFT's RankAllocator.budget_schedule, over several schedules;
    the refusals of a config without AdaLoRA and of a schedule with no pruning phase."""
    pytest.importorskip("peft")
    from types import SimpleNamespace

    from peft.tuners.adalora.layer import RankAllocator

    for kw in ({"tinit": 2, "tfinal": 3}, {"tinit": 0, "tfinal": 0, "deltaT": 3},
               {"tinit": 5, "tfinal": 20, "deltaT": 2}):
        s = lj.AdaLoraSchedule(target_r=3, total_step=40, **kw)
        theirs = SimpleNamespace(peft_config=SimpleNamespace(**dataclasses.asdict(s)), init_bgt=96, target_bgt=36)
        assert [adalora.budget(s, i, 96, 36) for i in range(45)] == \
            [RankAllocator.budget_schedule(theirs, i) for i in range(45)], kw
    with pytest.raises(ValueError, match="no AdaLoRA schedule"):
        adalora.rank_allocator(lj.LoraConfig(), optax.sgd(0.1))
    with pytest.raises(ValueError, match="leaves no pruning phase"):
        lj.AdaLoraSchedule(target_r=2, total_step=5, tinit=3, tfinal=2)


def test_to_lora_orbax_and_refusals(tiny_bloom_dir, tmp_path):
    """to_lora gives plain LoRA with the same deltas and the ranks cut to what is kept; the orbax
    checkpoint round-trips config and E; what cannot carry lora_E refuses it, naming the fix."""
    model, params = from_pretrained(tiny_bloom_dir)
    config = lj.LoraConfig(rank=4, alpha=8, targets=["query_key_value"],
                           adalora={"target_r": 2, "total_step": 10})
    assert isinstance(config.adalora, lj.AdaLoraSchedule)
    adapters = lj.init(config, params, jax.random.key(0))
    assert {k: v.shape for k, v in adapters["transformer/h/0/self_attention/query_key_value/kernel"].items()} == {
        "lora_A": (48, 4), "lora_B": (4, 144), "lora_E": (4,)}
    for ab in adapters.values():  # PEFT's init: A, B ~ N(0, 0.02^2), E = 0
        assert float(jnp.std(ab["lora_A"])) == pytest.approx(0.02, rel=0.15)
        assert float(jnp.std(ab["lora_B"])) == pytest.approx(0.02, rel=0.15) and not ab["lora_E"].any()
    g = lj.apply(model.apply, config)
    np.testing.assert_allclose(g(params, adapters, IDS), model.apply(params, IDS), atol=1e-6)  # E = 0 at init
    e = np.array([[0.5, 0.0, -0.3, 0.0], [0.0, 0.0, 0.7, 0.0]], np.float32)
    adapters = {p: {**ab, "lora_E": jnp.asarray(e[i])} for i, (p, ab) in enumerate(sorted(adapters.items()))}
    want = g(params, adapters, IDS)

    plain, converted = adalora.to_lora(config, adapters)
    assert plain.adalora is None
    assert [converted[p]["lora_A"].shape[-1] for p in sorted(converted)] == [2, 1]
    np.testing.assert_allclose(lj.apply(model.apply, plain)(params, converted, IDS), want, atol=1e-5)
    m = multi.multi(model.apply, {"x": plain})
    np.testing.assert_allclose(m.mixed(params, {"x": converted}, IDS, adapter_ids=m.ids(["x", "x"])), want, atol=1e-5)

    checkpoint.save(tmp_path / "ck", config, adapters, base_model="tiny")
    back = checkpoint.load(tmp_path / "ck", params)
    assert back.config == config
    np.testing.assert_array_equal(back.adapters[sorted(adapters)[0]]["lora_E"], e[0])

    out = lp.save_peft(tmp_path / "peft", config, adapters, model_config=model.config)
    cfg = json.loads((out / lp.CONFIG_FILE).read_text())
    assert cfg["rank_pattern"] == {f"transformer.h.{i}.self_attention.query_key_value.lora_E": (e[i] != 0).tolist()
                                   for i in range(2)}
    np.testing.assert_allclose(g(params, lp.load_peft(out, params).adapters, IDS), want, atol=1e-5)
    (out / lp.CONFIG_FILE).write_text(json.dumps({k: v for k, v in cfg.items() if k != "init_r"}))
    with pytest.raises(ValueError, match=r"adapter_config.json: an AdaLoRA config needs \['init_r'\]"):
        lp.load_peft(out, params)
    with pytest.raises(ValueError, match="AdaLoRA .* convert them to plain LoRA with lora_jax.adalora.to_lora"):
        multi.multi(model.apply, {"x": config})
    with pytest.raises(ValueError, match="reduce_intruders: AdaLoRA adapters are not supported"):
        lj.reduce_intruders(config, params, adapters)
    with pytest.raises(ValueError, match="lorafa .* not with use_kasa or adalora"):
        lj.lorafa(config, optax.sgd(0.1))
    with pytest.raises(ValueError, match=r"\(AdaLoRA\) sets its own ranks and scale; not with use_dora"):
        lj.LoraConfig(adalora={"total_step": 10}, use_dora=True)
    with pytest.raises(ValueError, match="target_r=8 exceeds the initial rank rank=4"):
        lj.LoraConfig(rank=4, adalora={"total_step": 10})
    with pytest.raises(ValueError, match="unknown field"):
        lj.LoraConfig(adalora={"total_steps": 10})
    with pytest.raises(ValueError, match="needs total_step"):
        lj.LoraConfig(adalora={"target_r": 2})
    with pytest.raises(ValueError, match="AdaLoRA .* adapts linear layers"):
        lj.init(lj.LoraConfig(rank=4, targets=["word_embeddings"], adalora={"target_r": 2, "total_step": 10}),
                params, jax.random.key(0))
