"""Orbax adapter checkpoints: exact round trip, fit checks against the base, atomic writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax import checkpoint as ck


# numpy, not jax.random: one XLA compile per shape would dominate these tests' runtime.
RNG = np.random.default_rng(0)


def make_params(d=8, layers=2, scanned=False):
    def layer(i):
        return {"attn": {"c_attn": {"kernel": RNG.normal(size=(d, 3 * d)).astype(np.float32),
                                    "bias": np.full((3 * d,), 0.1 * i, np.float32)}},
                "mlp": {"c_fc": {"kernel": np.ones((d, 4 * d), np.float32), "bias": np.zeros((4 * d,), np.float32)}}}
    h = {str(i): layer(i) for i in range(layers)}
    if scanned:
        h = jax.tree.map(lambda *xs: np.stack(xs), *h.values())
    return {"transformer": {"h": h, "ln_f": {"scale": np.ones((d,), np.float32), "bias": np.zeros((d,), np.float32)}}}


def trained(config, params):
    """Adapters of the right shapes with random nonzero A and B."""
    shapes = jax.eval_shape(lambda: lj.init(config, params, jax.random.key(0)))
    return jax.tree.map(lambda s: jnp.asarray(RNG.normal(size=s.shape), s.dtype), shapes)


def assert_same(a, b):
    fa, fb = lj.tree.flatten(a), lj.tree.flatten(b)
    assert fa.keys() == fb.keys()
    for p in fa:
        assert fa[p].dtype == fb[p].dtype, p
        np.testing.assert_array_equal(np.asarray(fa[p]), np.asarray(fb[p]), err_msg=p)


@pytest.mark.parametrize("scanned", [False, True])
def test_round_trip_is_exact(tmp_path, scanned):
    params = make_params(scanned=scanned)
    config = lj.LoraConfig(rank=4, alpha=8, targets=["c_attn", "c_fc"], rank_pattern={"c_fc": 2},
                           bias="lora_only", trainable=["ln_f"])
    adapters = trained(config, params)
    fc = next(p for p in adapters if "c_fc" in p)  # a bf16 adapter too: dtypes must survive
    adapters[fc] = jax.tree.map(lambda x: x.astype(jnp.bfloat16), adapters[fc])
    params = ck.update_params(params, {"transformer/ln_f/scale": np.full((8,), 1.5, np.float32)})
    ck.save(tmp_path / "c", config, adapters, base_model="tiny-gpt2", params=params)
    assert not list(tmp_path.glob(".*")), "temporary directories left behind"

    got = ck.load(tmp_path / "c", make_params(scanned=scanned), base_model="tiny-gpt2")
    assert got.config == config and got.base_model == "tiny-gpt2"
    assert_same(got.adapters, adapters)
    assert sorted(got.extras) == sorted(ck.trainable_leaves(config, params))
    assert_same(got.extras, ck.trainable_leaves(config, params))
    np.testing.assert_array_equal(got.extras["transformer/ln_f/scale"], 1.5)
    # Never the base weights: only adapters and the trained extras are in the manifest.
    manifest = json.loads((tmp_path / "c" / ck.MANIFEST).read_text())
    assert not [p for p in manifest["extras"] if p.endswith("kernel")]


def test_loading_onto_other_shapes_names_path_and_shapes(tmp_path):
    config = lj.LoraConfig(rank=2, targets=["c_attn"])
    params = make_params(d=8)
    ck.save(tmp_path / "c", config, trained(config, params), params=params)
    with pytest.raises(ValueError) as e:
        ck.load(tmp_path / "c", make_params(d=16))
    msg = str(e.value)
    assert "transformer/h/0/attn/c_attn/kernel" in msg and "(8, 24)" in msg and "(16, 48)" in msg
    # Same shapes, other structure: a base with one layer less.
    with pytest.raises(ValueError, match="transformer/h/1/attn/c_attn/kernel"):
        ck.load(tmp_path / "c", make_params(layers=1))
    # Unrolled adapters onto a scanned base.
    with pytest.raises(ValueError, match="no base parameter"):
        ck.load(tmp_path / "c", make_params(scanned=True))
    with pytest.raises(ValueError, match="trained on 'a'"):
        ck.save(tmp_path / "d", config, trained(config, params), base_model="a")
        ck.load(tmp_path / "d", params, base_model="b")


def test_extras_need_params_and_overwrite_is_explicit(tmp_path):
    params = make_params()
    config = lj.LoraConfig(rank=2, targets=["c_attn"], bias="all")
    adapters = trained(config, params)
    with pytest.raises(ValueError, match="pass params="):
        ck.save(tmp_path / "c", config, adapters)
    ck.save(tmp_path / "c", config, adapters, params=params)
    with pytest.raises(FileExistsError):
        ck.save(tmp_path / "c", config, adapters, params=params)
    ck.save(tmp_path / "c", config, jax.tree.map(jnp.zeros_like, adapters), params=params, overwrite=True)
    got = ck.load(tmp_path / "c", params).adapters["transformer/h/0/attn/c_attn/kernel"]
    assert float(jnp.abs(got["lora_A"]).sum()) == 0


def test_crash_mid_write_leaves_old_checkpoint(tmp_path, monkeypatch):
    params = make_params()
    config = lj.LoraConfig(rank=2, targets=["c_attn"])
    adapters = trained(config, params)
    ck.save(tmp_path / "c", config, adapters)

    def boom(_):
        raise KeyboardInterrupt("simulated crash")
    monkeypatch.setattr(ck, "_fsync_tree", boom)
    with pytest.raises(KeyboardInterrupt):
        ck.save(tmp_path / "c", config, jax.tree.map(jnp.zeros_like, adapters), overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        ck.save(tmp_path / "new", config, adapters)
    assert sorted(os.listdir(tmp_path)) == ["c"]
    assert_same(ck.load(tmp_path / "c", params).adapters, adapters)


def test_written_directories_get_the_umask_modes(tmp_path):
    """An atomic write lands with the modes a plain save gets (not mkdtemp's 0700 / 0600)."""
    from lora_jax import peft as lp
    from lora_jax.models import GPT2Config

    params = make_params()
    config = lj.LoraConfig(rank=2, targets=["c_attn"])
    adapters = trained(config, params)
    old = os.umask(0o027)
    try:
        for d in (ck.save(tmp_path / "c", config, adapters),
                  lp.save_peft(tmp_path / "p", config, adapters, params=params,
                               model_config=GPT2Config(vocab_size=16, hidden_size=8, num_layers=2, num_heads=2,
                                                       intermediate_size=32, max_position_embeddings=8))):
            for dirpath, _, files in os.walk(d):
                assert os.stat(dirpath).st_mode & 0o777 == 0o750, dirpath
                for f in files:
                    assert os.stat(os.path.join(dirpath, f)).st_mode & 0o777 == 0o640, f
    finally:
        os.umask(old)


def test_corrupted_checkpoint_names_the_file(tmp_path):
    params = make_params()
    config = lj.LoraConfig(rank=2, targets=["c_attn"])
    ck.save(tmp_path / "c", config, trained(config, params))
    manifest = tmp_path / "c" / ck.MANIFEST
    text = manifest.read_text()
    manifest.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=str(manifest)):
        ck.load(tmp_path / "c", params)
    manifest.write_text(text)
    # Truncate every data file orbax wrote.
    for root, _, files in os.walk(tmp_path / "c" / "arrays"):
        for f in files:
            if "/d" in root.replace(os.sep, "/"):
                path = os.path.join(root, f)
                with open(path, "r+b") as fh:
                    fh.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ValueError, match="arrays.*truncated or corrupted"):
        ck.load(tmp_path / "c", params)


SHARDED_SAVE = """
import sys, jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import lora_jax as lj
from lora_jax import checkpoint as ck
params = {"h": {"c": {"kernel": np.ones((8, 16), np.float32)}}}
config = lj.LoraConfig(rank=4, targets=["c"])
mesh = Mesh(np.array(jax.devices()), ("d",))
a, b = np.arange(32, dtype=np.float32).reshape(8, 4), np.arange(64, dtype=np.float32).reshape(4, 16)
ck.save(sys.argv[1], config, {"h/c/kernel": {"lora_A": jax.device_put(a, NamedSharding(mesh, P("d", None))),
                                             "lora_B": jax.device_put(b, NamedSharding(mesh, P(None, "d")))}})
"""


def test_adapters_saved_sharded_on_four_devices_load_onto_one(tmp_path):
    """Trained on a mesh, loaded elsewhere: orbax must not insist on the saved 4-device sharding."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, "-c", SHARDED_SAVE, str(tmp_path / "c")], env=env, capture_output=True,
                         text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr[-3000:]
    got = ck.load(tmp_path / "c", {"h": {"c": {"kernel": np.ones((8, 16), np.float32)}}}).adapters["h/c/kernel"]
    np.testing.assert_array_equal(got["lora_A"], np.arange(32, dtype=np.float32).reshape(8, 4))
    np.testing.assert_array_equal(got["lora_B"], np.arange(64, dtype=np.float32).reshape(4, 16))
    assert all(len(x.sharding.device_set) == 1 for x in got.values())


def test_home_relative_directory_loads_where_it_was_saved(tmp_path, monkeypatch):
    """save expands '~' (atomic_directory), so load and read_manifest must too."""
    monkeypatch.setenv("HOME", str(tmp_path))
    params = make_params()
    config = lj.LoraConfig(rank=2, targets=["c_attn"])
    adapters = trained(config, params)
    written = ck.save("~/adapter", config, adapters)
    assert (tmp_path / "adapter" / ck.MANIFEST).is_file()
    assert ck.read_manifest("~/adapter")["format"] == ck.FORMAT
    assert_same(ck.load(written, params).adapters, adapters)


def test_failed_final_rename_puts_the_old_checkpoint_back(tmp_path, monkeypatch):
    """Overwriting moves the old directory aside first; if the new one then cannot take its place,
    the old one must be back under its name (atomic_directory's promise: `directory` untouched)."""
    params = make_params()
    config = lj.LoraConfig(rank=2, targets=["c_attn"])
    adapters = trained(config, params)
    ck.save(tmp_path / "c", config, adapters)
    replace = os.replace

    def flaky(src, dst):
        if os.path.basename(src).startswith(".c.tmp-"):
            raise OSError("simulated failure of the final rename")
        replace(src, dst)
    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError, match="simulated"):
        ck.save(tmp_path / "c", config, jax.tree.map(jnp.zeros_like, adapters), overwrite=True)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["c"]
    assert_same(ck.load(tmp_path / "c", params).adapters, adapters)


def test_overwrite_refuses_a_directory_that_holds_no_checkpoint(tmp_path):
    """overwrite=True replaces a checkpoint, never a mistyped run directory (or ".") wholesale."""
    params = make_params()
    config = lj.LoraConfig(rank=2, targets=["c_attn"])
    adapters = trained(config, params)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(FileExistsError, match=r"run is not empty and holds no checkpoint"):
        ck.save(run, config, adapters, overwrite=True)
    assert sorted(os.listdir(run)) == ["metrics.jsonl"] and sorted(os.listdir(tmp_path)) == ["run"]
    (tmp_path / "empty").mkdir()
    ck.save(tmp_path / "empty", config, adapters, overwrite=True)  # an empty directory is replaced
    assert_same(ck.load(tmp_path / "empty", params).adapters, adapters)
