"""FSDP placement (`lora_jax.sharding`): which dimension each leaf splits on, the errors, and a LoRA /
QLoRA train step on 4 host devices that equals the one-device step while each device holds ~1/4."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, PartitionSpec as P

from lora_jax import sharding

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("shape, spec", [
    ((768, 2304), P(None, "data")),        # the larger dimension
    ((50257, 768), P(None, "data")),       # the vocabulary is not divisible by 4: the width is
    ((2304, 768), P("data", None)),
    ((12, 768, 2304), P(None, None, "data")),  # a layer stack: never the leading (scanned) dimension
    ((12, 768, 16), P(None, "data", None)),    # stacked lora_A [L, in, r]
    ((4, 1024), P(None, "data")),           # 4 x 1024 elements: split
    ((768,), P()),                          # a bias: below MIN_SIZE, replicated
    ((1023, 3), P()),                       # nothing divisible by 4
    ((), P()),
])
def test_fsdp_spec_picks_the_largest_divisible_dimension(shape, spec):
    assert sharding.fsdp_spec(shape, 4) == spec
    assert sharding.fsdp_spec(shape, 1) == P()  # one device: nothing to split


def test_fsdp_needs_an_auto_axis_it_has():
    devices = np.asarray(jax.devices()[:1])
    tree = {"w": np.zeros((64, 64))}
    with pytest.raises(ValueError, match="no axis 'data'"):
        sharding.fsdp(tree, Mesh(devices, ("model",)))
    with pytest.raises(ValueError, match="'data' is .*Explicit.*Auto"):
        sharding.fsdp(tree, Mesh(devices, ("data",), axis_types=(AxisType.Explicit,)))
    got = sharding.fsdp({"w": np.zeros((64, 64)), "b": None}, Mesh(devices, ("data",)))
    assert got["b"] is None and got["w"].spec == P()


# Runs under 4 forced host devices: a fresh process, since the device count is fixed at JAX's start.
SCRIPT = r"""
import json, jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import lora_jax as lj
from lora_jax import quant, sharding
from lora_jax.models import CausalLM, GPT2Config

assert jax.device_count() == 4
model = CausalLM(GPT2Config(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256,
                            max_position_embeddings=32))
params = model.init_params(jax.random.key(0))
config = lj.LoraConfig(rank=8, alpha=16, targets=["c_attn", "c_fc"], bias="lora_only")
ids = jax.random.randint(jax.random.key(3), (8, 16), 0, 128)
mesh = Mesh(np.asarray(jax.devices()), ("data",))
report = {}
for name, base in [("dense", params), ("nf4", quant.quantize(params, double_quant=True))]:
    g = lj.apply(quant.apply(model.apply), config)
    loss = lambda p, a, ids: optax.softmax_cross_entropy_with_integer_labels(g(p, a, ids)[:, :-1], ids[:, 1:]).mean()
    train = lj.make_train_step(loss, optax.sgd(0.5, momentum=0.9))  # linear in the gradients: no Adam rescaling
    trainable, frozen = lj.split(config, base, lj.init(config, base, jax.random.key(1)))
    opt_state = train.init(trainable)

    one = jax.jit(train.step)
    t1, o1 = trainable, opt_state
    for _ in range(2):
        t1, o1, l1 = one(t1, frozen, o1, ids)

    state_sh = sharding.fsdp((trainable, opt_state), mesh)
    frozen_sh = sharding.fsdp(frozen, mesh)
    t, o = jax.device_put((trainable, opt_state), state_sh)
    fr = jax.device_put(frozen, frozen_sh)
    ids_d = jax.device_put(ids, NamedSharding(mesh, P("data")))
    step = jax.jit(train.step, out_shardings=(*state_sh, None))
    for _ in range(2):
        t, o, l = step(t, fr, o, ids_d)
    err = max(float(jnp.max(jnp.abs(jnp.asarray(x) - y))) for x, y in zip(jax.tree.leaves(t), jax.tree.leaves(t1)))
    # every leaf of MIN_SIZE or more is split 4 ways, and stays split after the step
    split = [x for x in jax.tree.leaves((t, o, fr)) if x.size >= sharding.MIN_SIZE]
    quarters = all(x.addressable_shards[0].data.size * 4 == x.size for x in split)
    whole = sum(x.nbytes for x in jax.tree.leaves((t, o, fr)))
    mem = lambda f, *a: f.lower(*a).compile().memory_analysis().argument_size_in_bytes
    moved = max(float(jnp.max(jnp.abs(jnp.asarray(x) - y)))
                for x, y in zip(jax.tree.leaves(t), jax.tree.leaves(trainable)))
    report[name] = dict(err=err, moved=moved, loss=float(l), loss_one=float(l1), quarters=quarters,
                        n_split=len(split), per_device=sharding.bytes_per_device((t, o, fr)), whole=whole,
                        arg_bytes_fsdp=mem(step, t, fr, o, ids_d),
                        arg_bytes_one=mem(one, trainable, frozen, opt_state, ids))

# train.loop's pmap step: each device draws its own dropout masks (one key, folded with the device)
from train.loop import StepConfig, make_step
def noise(params, adapters, micro, rng):  # a loss that is the step's random draw
    return jax.random.uniform(rng) + 0 * sum(x.sum() for x in jax.tree.leaves(adapters)), jnp.float32(1)
pstep = jax.pmap(make_step(noise, optax.sgd(0.0), StepConfig(accum=1, micro_batch=4), axis_name="data"),
                 axis_name="data", in_axes=(0, None, 0, 0, None))
small = {"adapters": {"w": jnp.ones(2)}, "params": {}}
rep = lambda t: jax.tree.map(lambda x: jnp.stack([x] * 4), t)  # noqa: E731
key = jax.random.key(5)
_, _, m = pstep(rep(small), {}, rep(optax.sgd(0.0).init(small)), jnp.zeros((4, 1, 1, 2)), jax.random.key_data(key))
want = np.mean([float(jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, d), 0))) for d in range(4)])
report["pmap_rng"] = dict(loss=float(m["loss"][0]), want=float(want),
                          same_draws=float(jax.random.uniform(jax.random.fold_in(key, 0))))
print("REPORT" + json.dumps(report))
"""


def test_fsdp_train_step_on_four_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.split("REPORT", 1)[1])
    r = report.pop("pmap_rng")
    assert r["loss"] == pytest.approx(r["want"], abs=1e-6) and abs(r["loss"] - r["same_draws"]) > 1e-3, r
    for name, r in report.items():
        assert r["err"] < 1e-5 and abs(r["loss"] - r["loss_one"]) < 1e-5 and r["moved"] > 1e-3, (name, r)
        assert r["quarters"] and r["n_split"] >= 8, (name, r)
        # biases, norms and NF4 scales stay whole; the rest is a quarter per device
        assert r["per_device"] < 0.4 * r["whole"], (name, r)
        assert r["arg_bytes_fsdp"] < 0.4 * r["arg_bytes_one"], (name, r)
