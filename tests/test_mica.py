"""MiCA (PEFT's init_lora_weights="mica"): PEFT's init on linear layers and embeddings, training
with lora_B fixed against PEFT's, optimizer state for lora_A alone, the CLI, refusals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from lora_jax import peft as lp
from lora_jax.models import from_pretrained

IDS = np.array([[5, 9, 17, 33, 2, 7], [40, 41, 42, 3, 3, 3]])
TARGETS = {"gpt2": ["c_attn", "c_fc", "wte"], "bloom": ["query_key_value", "word_embeddings"]}


@pytest.mark.parametrize("name", ["gpt2", "bloom"])
def test_init_matches_peft(name, tiny_gpt2_dir, tiny_bloom_dir):
    """PEFT's lora_B (the minor singular vectors of each weight, GPT-2's Conv1D and the embedding
    tables included) up to the sign of each vector, lora_A zero, the model unchanged."""
    peft = pytest.importorskip("peft")
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    directory = {"gpt2": tiny_gpt2_dir, "bloom": tiny_bloom_dir}[name]
    pm = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager"),
                             peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[name], init_lora_weights="mica"))
    theirs = {k: v.detach().numpy() for k, v in get_peft_model_state_dict(pm).items()}
    model, params = from_pretrained(directory)
    config = lj.LoraConfig(rank=4, alpha=8, targets=TARGETS[name], init="mica")
    adapters = lj.init(config, params, jax.random.key(0))
    ours = lp.peft_state_dict(config, adapters, model_config=model.config)
    assert set(ours) == set(theirs)
    for k, v in ours.items():
        if "_A" in k:
            assert not v.any() and not theirs[k].any(), k
        else:  # (out, r): each column a unit vector, the same as PEFT's up to its sign
            np.testing.assert_allclose(np.abs((v * theirs[k]).sum(0)), 1.0, atol=1e-5, err_msg=k)
    np.testing.assert_allclose(lj.apply(model.apply, config)(params, adapters, IDS), model.apply(params, IDS),
                               atol=1e-6)


def test_training_matches_peft(tiny_bloom_dir, tmp_path, peft_train):
    """Three Adam steps on the same loss from the same start: PEFT (which loads our export's
    init_lora_weights="mica" and freezes lora_B) and lj.mica give the same lora_A, lora_B unmoved;
    the optimizer state holds Adam's moments for lora_A alone; summary counts what PEFT counts."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model, params = from_pretrained(tiny_bloom_dir)
    config = lj.LoraConfig(rank=4, alpha=8, targets=["query_key_value", "dense_4h_to_h"], init="mica")
    start = lj.init(config, params, jax.random.key(0))
    out = lp.save_peft(tmp_path / "start", config, start, model_config=model.config)
    assert lp.load_peft(out, params).config.init == "mica"
    hf = AutoModelForCausalLM.from_pretrained(tiny_bloom_dir, attn_implementation="eager")
    pm = peft.PeftModel.from_pretrained(hf, str(out), is_trainable=True).eval()
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-2, eps=1e-12)
    theirs = peft_train(pm, opt, IDS)

    g = lj.apply(model.apply, config)
    tx = lj.mica(config, optax.adam(1e-2, eps=1e-12))
    ts = lj.make_train_step(lambda p, a, x: optax.softmax_cross_entropy_with_integer_labels(
        g(p, a, x)[:, :-1], x[:, 1:]).mean(), tx)
    trainable, frozen = lj.split(config, params, start)
    opt_state, step = ts.init(trainable), jax.jit(ts.step)
    n_a = sum(ab["lora_A"].size for ab in start.values())
    assert sum(x.size for x in jax.tree.leaves(opt_state)) == 2 * n_a + 1  # mu and nu of A, one count
    for _ in range(3):
        trainable, opt_state, _ = step(trainable, frozen, opt_state, IDS)
    ours = lp.peft_state_dict(config, trainable["adapters"], model_config=model.config)
    begin = lp.peft_state_dict(config, start, model_config=model.config)
    for k in ours:
        if ".lora_B." in k:
            np.testing.assert_array_equal(ours[k], begin[k])
            np.testing.assert_array_equal(theirs[k], begin[k])
        else:
            assert np.abs(ours[k]).max() > 1e-3, k
            np.testing.assert_allclose(ours[k], theirs[k], atol=1e-5, rtol=0, err_msg=k)
    trainable_peft = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert lj.summary(config, params, start).trainable == trainable_peft == n_a


def test_refusals(tiny_gpt2_dir):
    model, params = from_pretrained(tiny_gpt2_dir)
    for kw, msg in ((dict(use_dora=True), "not with use_dora"), (dict(lora_bias=True), "not with lora_bias"),
                    (dict(velora_num_groups=4), "not with velora_num_groups"),
                    (dict(use_kasa=True), "KaSA.*init must be one of .*got 'mica'")):
        with pytest.raises(ValueError, match=msg):
            lj.LoraConfig(init="mica", **kw)
    config = lj.LoraConfig(rank=4, alpha=8, init="mica")
    with pytest.raises(ValueError, match="MiCA's B is made of the SVD of 'transformer/h/0/attn/c_attn/kernel': "
                                         "init needs the weights, not ShapeDtypeStruct"):
        lj.init(config, jax.eval_shape(lambda: params), jax.random.key(0))
    with pytest.raises(ValueError, match="lorafa trains lora_B alone, MiCA .* lora_A alone"):
        lj.lorafa(config, optax.adam(1e-3))
    with pytest.raises(ValueError, match="mica: the config's init is 'kaiming_uniform', not 'mica'"):
        lj.mica(lj.LoraConfig(), optax.adam(1e-3))
    assert not jnp.any(lj.init(config, params, jax.random.key(0))["transformer/h/1/attn/c_attn/kernel"]["lora_A"])
