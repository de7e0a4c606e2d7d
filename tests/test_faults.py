"""Faults: SIGKILL during training or a checkpoint save, non-finite steps, bad input, 2 processes.

Each injected fault and what it may lose:
* SIGKILL between steps: the steps since the last checkpoint (at most --checkpoint-every).
* SIGKILL inside a checkpoint save: that checkpoint; the previous complete one is resumed.
* a non-finite loss/gradient: nothing (the step is not applied; the run stops or skips it).
* bad input: nothing is written at all.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lora_jax as lj
from train import squad
from train.state import TrainCheckpoints

from test_squad import cli_args, tiny_squad

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["--steps", "6", "--checkpoint-every", "2", "--no-base-eval", "--eval-samples", "1", "--eval-batch-size", "1"]
SLOW_STEPS = """
import time, train.loop as L
_step = L.Runner.step
def step(self, *a, **k):
    time.sleep(0.4)  # give the test time to kill the run between steps
    return _step(self, *a, **k)
L.Runner.step = step
"""
KILL_IN_SAVE = """
import os, signal, train.state as S
_save = S.TrainCheckpoints.save
def save(self, step, *a, **k):
    if step == 4:
        import orbax.checkpoint as ocp
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"x": __import__("numpy").zeros(10**6)}),
                                                        meta=ocp.args.JsonSave({})))
        os.kill(os.getpid(), signal.SIGKILL)  # mid-save: the async write is still in flight
    return _save(self, step, *a, **k)
S.TrainCheckpoints.save = save
"""


def start(args, patch: str = "") -> subprocess.Popen:
    code = patch + "\nimport sys\nfrom train.squad import main\nsys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def final_trainable(out: Path, step: int = 6) -> dict:
    ck = TrainCheckpoints(out / "checkpoints" / "lora")
    try:
        return ck.manager.restore(step)["state"]["trainable"]
    finally:
        ck.close()


@pytest.fixture(scope="module")
def setup(tiny_gpt2_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    data = tiny_squad(tmp / "squad.json")
    ref = tmp / "reference"
    assert squad.main(cli_args(tiny_gpt2_dir, data, ref, *STEPS)) == 0
    return tiny_gpt2_dir, data, final_trainable(ref), tmp


def _assert_same(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_sigkill_during_training_then_resume(setup):
    model, data, reference, tmp = setup
    out = tmp / "killed"
    proc = start(cli_args(model, data, out, *STEPS), SLOW_STEPS)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "lora" / "2").is_dir():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists()
    assert squad.main(cli_args(model, data, out, *STEPS, "--resume")) == 0
    _assert_same(final_trainable(out), reference)


def test_sigkill_during_checkpoint_save_then_resume(setup):
    model, data, reference, tmp = setup
    out = tmp / "killed_in_save"
    proc = start(cli_args(model, data, out, *STEPS), KILL_IN_SAVE)
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    ck = TrainCheckpoints(out / "checkpoints" / "lora")
    assert ck.latest_step() == 2  # the interrupted step-4 save never became a checkpoint
    ck.close()
    assert squad.main(cli_args(model, data, out, *STEPS, "--resume")) == 0
    _assert_same(final_trainable(out), reference)


def test_checkpoints_after_the_resumed_step_are_dropped(tmp_path):
    """orbax silently skips saving a step below its latest one: a run resumed from step 3 (say, after
    a kill) must first drop the --keep-best checkpoint it had saved at step 5, or its new bests vanish."""
    ck = TrainCheckpoints(tmp_path / "best", keep=1)
    ck.save(5, {"a": np.ones(2)}, {}, {"val_loss": 1.0})
    ck.save(2, {"a": np.zeros(2)}, {}, {"val_loss": 0.5})
    assert ck.manager.all_steps() == [5]  # skipped, without an error
    ck.drop_after(3)
    ck.save(2, {"a": np.zeros(2)}, {}, {"val_loss": 0.5})
    assert ck.manager.all_steps() == [2] and ck.read_meta(2)["val_loss"] == 0.5
    np.testing.assert_array_equal(ck.restore({"a": np.ones(2)}, {}, 2)[0]["a"], np.zeros(2))
    ck.close()


def test_resume_refuses_other_leaves_of_the_same_shapes(tmp_path):
    """--resume with --layers-to-transform 1 after 0 (or other targets of equal shapes) has the same
    number of leaves of the same shapes: the checkpoint's adapters and Adam moments must not land on
    another layer's; the first leaf that differs is named."""
    def tree(layer):
        return {"adapters": {f"transformer/h/{layer}/attn/c_attn": {"lora_A": np.full((4, 2), 1.0 + layer)}},
                "params": {}}
    ck = TrainCheckpoints(tmp_path / "lora")
    ck.save(2, tree(0), {"mu": tree(0)}, {"seed": 0})
    with pytest.raises(ValueError, match=r"trainable tree does not fit this run: it holds "
                                         r"\['adapters'\]\['transformer/h/0/attn/c_attn'\]\['lora_A'\]"):
        ck.restore(tree(1), {"mu": tree(1)})
    with pytest.raises(ValueError, match=r"optimizer state \['mu'\]\['adapters'\]\['transformer/h/0/attn/c_attn'\]"
                                         r"\['lora_A'\] has shape \(4, 2\), this run expects \(4, 3\)"):
        ck.restore(tree(0), {"mu": {"adapters": {"transformer/h/0/attn/c_attn": {"lora_A": np.ones((4, 3))}},
                                    "params": {}}})
    t, _, meta = ck.restore(tree(0), {"mu": tree(0)})
    assert meta == {"seed": 0, "step": 2} and float(t["adapters"]["transformer/h/0/attn/c_attn"]["lora_A"][0, 0]) == 1
    ck.close()


def test_metrics_row_cut_short_by_a_crash(tmp_path):
    """A run killed (or out of disk) while appending to metrics.jsonl leaves half a row: --resume
    (and the loss plot) read the rows before it, and the resumed run's rows start on a line of their own."""
    from train import report
    path = tmp_path / "metrics.jsonl"
    rows = [{"run": "lora", "step": 1, "loss": 2.0}, {"run": "lora", "step": 2, "loss": 1.5}]
    path.write_text("".join(map(report.json_line, rows)) + report.json_line({"run": "lora", "step": 3})[:12])
    assert report.read_metrics(path) == rows
    report.drop_metrics_after(path, "lora", 2)
    with path.open("a") as f:
        f.write(report.json_line({"run": "lora", "step": 3, "loss": 1.0}))
    assert report.read_metrics(path) == [*rows, {"run": "lora", "step": 3, "loss": 1.0}]
    report.loss_plot(path, tmp_path / "loss.png")


def test_nonfinite_loss_stops_with_the_step_and_keeps_checkpoint(setup, capsys):
    model, data, _, tmp = setup
    out = tmp / "nan"
    args = cli_args(model, data, out, "--steps", "4", "--checkpoint-every", "1", "--no-base-eval", "--warmup", "0")
    args[args.index("--lr") + 1] = "1e30"  # one Adam step of size 1e30 makes the next loss non-finite
    assert squad.main(args) == 1
    err = capsys.readouterr().err
    assert "non-finite loss/gradient at step 2" in err
    ck = TrainCheckpoints(out / "checkpoints" / "lora")
    assert ck.latest_step() == 1
    ck.close()
    assert squad.main(args + ["--skip-nonfinite", "--output-dir", str(tmp / "nan_skip")]) == 0
    last = json.loads((tmp / "nan_skip" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 4 and last["skipped_nonfinite"] == 3


# --- bad input: one clear error, non-zero exit, nothing written --------------------------------


def _fails(args, capsys, match: str, out: Path, code: int = 1):
    try:
        rc = squad.main(args)
    except SystemExit as e:  # argparse
        rc = e.code
    assert rc == code
    err = capsys.readouterr().err
    assert match in err, err
    assert not out.exists(), "bad input must leave no output behind"


def test_unknown_flag(tmp_path, capsys):
    _fails(["--learning-rate", "1", "--output-dir", str(tmp_path / "o")], capsys, "unrecognized arguments",
           tmp_path / "o", code=2)


def test_bad_flag_value(tmp_path, capsys):
    _fails(["--parallel", "tpu", "--output-dir", str(tmp_path / "o")], capsys, "invalid choice: 'tpu'",
           tmp_path / "o", code=2)


def test_missing_data_file(tiny_gpt2_dir, tmp_path, capsys):
    _fails(cli_args(tiny_gpt2_dir, tmp_path / "nope.json", tmp_path / "o"), capsys, "nope.json", tmp_path / "o")


def test_missing_model_dir(tmp_path, capsys):
    _fails(cli_args(tmp_path / "no_model", tmp_path / "x.json", tmp_path / "o"), capsys, "no_model", tmp_path / "o")


def test_revision_of_a_local_dir_or_the_embedded_model(tiny_gpt2_dir, tmp_path, capsys):
    data = tiny_squad(tmp_path / "squad.json")
    _fails(cli_args(tiny_gpt2_dir, data, tmp_path / "o", "--revision", "v1"), capsys,
           f"revision='v1' names a hub revision, but '{tiny_gpt2_dir}' is a local directory", tmp_path / "o")
    _fails(["--revision", "v1", "--output-dir", str(tmp_path / "o")], capsys,
           "--revision v1 needs --model", tmp_path / "o")


def test_data_not_squad_shaped(tiny_gpt2_dir, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": [1, 2, 3]}))
    _fails(cli_args(tiny_gpt2_dir, bad, tmp_path / "o"), capsys, "expected a SQuAD", tmp_path / "o")


def test_tokenizer_that_does_not_fit(tiny_gpt2_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    tok.add_tokens([f"<extra{i}>" for i in range(64)])  # 320 + 64 > the model's 320 rows
    tok.save_pretrained(tmp_path / "tok")
    data = tiny_squad(tmp_path / "squad.json")
    _fails(cli_args(tiny_gpt2_dir, data, tmp_path / "o", "--tokenizer", str(tmp_path / "tok")), capsys,
           "does not fit the model", tmp_path / "o")


def test_corrupted_safetensors(tiny_gpt2_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_gpt2_dir, broken)
    f = broken / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    data = tiny_squad(tmp_path / "squad.json")
    _fails(cli_args(broken, data, tmp_path / "o"), capsys, "model.safetensors", tmp_path / "o")


def test_adapter_made_for_another_base(tiny_gpt2_dir, tiny_bloom_dir, tmp_path, capsys):
    from lora_jax import checkpoint
    from lora_jax.models import from_pretrained

    _, bloom = from_pretrained(tiny_bloom_dir)
    config = lj.LoraConfig(rank=2, targets=["query_key_value"])
    checkpoint.save(tmp_path / "bloom_adapter", config, lj.init(config, bloom, jax.random.key(0)),
                    base_model=str(tiny_bloom_dir), params=bloom)
    data = tiny_squad(tmp_path / "squad.json")
    _fails(cli_args(tiny_gpt2_dir, data, tmp_path / "o", "--init-adapter", str(tmp_path / "bloom_adapter")), capsys,
           "query_key_value", tmp_path / "o")


def test_targets_matching_nothing(tiny_gpt2_dir, tmp_path, capsys):
    data = tiny_squad(tmp_path / "squad.json")
    _fails(cli_args(tiny_gpt2_dir, data, tmp_path / "o", "--targets", "c_atn"), capsys,
           "match no weight", tmp_path / "o")


# --- property tests ---------------------------------------------------------------------------

JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                       lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                       max_leaves=8)
FIELDS = st.sampled_from(["rank", "alpha", "targets", "exclude", "dropout", "init", "use_rslora", "use_dora", "rank_pattern",
                          "alpha_pattern", "bias", "trainable", "bogus"])


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(FIELDS, JSONISH | st.integers(1, 64) | st.sampled_from(["c_attn", ["q", "v"], "none"]),
                       max_size=6))
def test_config_json_loader_never_crashes_unexpectedly(d):
    """Any JSON object either loads into a config that round-trips, or raises ValueError."""
    try:
        c = lj.LoraConfig.from_json(json.dumps(d))
    except ValueError:
        return
    assert lj.LoraConfig.from_json(c.to_json()) == c
