"""target_parameters: LoRA on parameters of any name, such as a mixture of experts' [E, in, out]
weights used in einsums (PEFT's `target_parameters`, one LoRA per expert)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from lora_jax import peft as lp
from lora_jax.models import GPT2Config

E, D, F, R = 4, 16, 32, 4


class Experts(nn.Module):
    @nn.compact
    def __call__(self, x, probs):  # x [B, T, D], probs [B, T, E]
        init = nn.initializers.normal(0.2)
        w_in = self.param("w_in", init, (E, D, F))
        w_out = self.param("w_out", init, (E, F, D))
        h = jax.nn.gelu(jnp.einsum("btd,edf->btef", x, w_in), approximate=False)  # experts as a free dim
        y = jnp.einsum("ebtf,efd->ebtd", jnp.moveaxis(h, 2, 0), w_out)  # experts as a batch dim
        return jnp.einsum("ebtd,bte->btd", y, probs)


class MoE(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Experts(name="experts")(x, jax.nn.softmax(nn.Dense(E, name="router")(x)))


CONFIG = lj.LoraConfig(rank=R, alpha=8, targets=[], target_parameters=["experts/w_in", "experts/w_out"])
X = np.asarray(jax.random.normal(jax.random.key(0), (2, 5, D)))


def test_expert_weights_match_peft_target_parameters(nudge_torch):
    """PEFT's ParamWrapper on the same torch module holds one LoRA per expert: for an [E, in, out]
    parameter its lora_B (in, r*E) is our A and its lora_A (r*E, out) our B (PEFT swaps the
    sides of 3-D parameters); laid out as [E, in, r] / [E, r, out] they give our logits."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    class TorchExperts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w_in = torch.nn.Parameter(0.2 * torch.randn(E, D, F))
            self.w_out = torch.nn.Parameter(0.2 * torch.randn(E, F, D))

        def forward(self, x, probs):
            h = torch.nn.functional.gelu(torch.einsum("btd,edf->btef", x, self.w_in))
            return torch.einsum("bted,bte->btd", torch.einsum("btef,efd->bted", h, self.w_out), probs)

    class TorchMoE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.router, self.experts = torch.nn.Linear(D, E), TorchExperts()

        def forward(self, x):
            return self.experts(x, torch.softmax(self.router(x), -1))

    torch.manual_seed(0)
    base = TorchMoE()
    params = {"params": {"router": {"kernel": base.router.weight.detach().numpy().T,
                                    "bias": base.router.bias.detach().numpy()},
                         "experts": {"w_in": base.experts.w_in.detach().numpy(),
                                     "w_out": base.experts.w_out.detach().numpy()}}}
    pm = nudge_torch(peft.get_peft_model(base, peft.LoraConfig(
        r=R, lora_alpha=8, target_modules=[], target_parameters=["experts.w_in", "experts.w_out"])), seed=1)
    with torch.no_grad():
        want = pm(torch.tensor(X)).numpy()
    adapters = {}
    for module in pm.modules():
        if hasattr(module, "parameter_name") and "default" in module.lora_A:
            a = module.lora_A["default"].weight.detach().numpy()  # (E*r, out): delta[e] = B_e A_e
            b = module.lora_B["default"].weight.detach().numpy()  # (in, r*E)
            adapters[f"params/experts/{module.parameter_name}"] = {
                "lora_A": b.reshape(b.shape[0], R, E).transpose(2, 0, 1),  # [E, in, r]
                "lora_B": a.reshape(E, R, -1)}  # [E, r, out]
    assert sorted(adapters) == sorted(lj.init(CONFIG, params, jax.random.key(0)))
    got = jax.jit(lj.apply(MoE().apply, CONFIG, strict=True))(params, adapters, X)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert np.abs(want - MoE().apply(params, X)).max() > 1e-2  # the adapters matter


def test_stacked_expert_layers_stay_factored_and_train():
    """Under nn.scan the weights are [L, E, in, out]: the factors [L, E, in, r] run sliced per
    layer, never forming A B (strict), equal to the merged reference, and a step trains them."""
    scanned = nn.scan(lambda m, x, _: (m(x) + x, None), variable_axes={"params": 0}, split_rngs={"params": True},
                      length=2)

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            return scanned(MoE(name="layers"), x, None)[0]

    model = Stack()
    params = model.init(jax.random.key(1), X)
    adapters = lj.init(CONFIG, params, jax.random.key(2))
    assert adapters["params/layers/experts/w_in"]["lora_A"].shape == (2, E, D, R)
    adapters = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(3), a.shape), adapters)
    lazy = jax.jit(lj.apply(model.apply, CONFIG, strict=True))
    np.testing.assert_allclose(lazy(params, adapters, X),
                               lj.apply(model.apply, CONFIG, strategy="merged")(params, adapters, X), atol=1e-5)

    ts = lj.make_train_step(lambda p, a, x: jnp.mean(lj.apply(model.apply, CONFIG, strict=True)(p, a, x) ** 2),
                            optax.adam(1e-2))
    trainable, frozen = lj.split(CONFIG, params, adapters)
    new, _, loss = jax.jit(ts.step)(trainable, frozen, ts.init(trainable), X)
    assert float(loss) > 0 and all(np.any(new["adapters"][p]["lora_B"] != adapters[p]["lora_B"]) for p in adapters)


def test_parameter_targets_refused_where_they_do_not_fit(tmp_path):
    params = MoE().init(jax.random.key(1), X)
    with pytest.raises(ValueError, match="targets must be a regex string or a non-empty list"):
        lj.LoraConfig(targets=[])
    with pytest.raises(ValueError, match=r"target_parameters \('experts/w_mid',\) match no weight.*closest"):
        lj.target_paths(lj.LoraConfig(targets=[], target_parameters=["experts/w_mid"]), params)
    assert lj.target_paths(lj.LoraConfig(rank=2, targets=["router"], target_parameters=".*/w_in"), params) == [
        "params/experts/w_in", "params/router/kernel"]
    with pytest.raises(ValueError, match="DoRA targets linear layers and embeddings; 'params/experts/w_in' is neither"):
        lj.init(lj.LoraConfig(targets=[], target_parameters=["w_in"], use_dora=True), params, jax.random.key(0))
    assert lj.LoraConfig.from_json(CONFIG.to_json()) == CONFIG
    with pytest.raises(ValueError, match="PEFT export: 'params/experts/w_in' is adapted as a parameter"):
        lp.save_peft(tmp_path / "peft", CONFIG, lj.init(CONFIG, params, jax.random.key(0)),
                     model_config=GPT2Config(vocab_size=8, hidden_size=8, num_layers=1, num_heads=2,
                                             intermediate_size=8, max_position_embeddings=8))
    assert not (tmp_path / "peft").exists()
