"""benchmarks/bench.py: the CPU smoke run covers every case, and the compiled LoRA train step of
the real GPT-2 124M costs <= 0.72x the FLOPs and less memory than full fine-tuning.

    .venv/bin/pytest -q -s tests/test_bench.py     # ~1.5 min on 2 cores; -s prints the figures
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `benchmarks` is a top-level folder, not an installed package

from benchmarks import bench  # noqa: E402

MODELS = ("gpt2", "bloom-560m")


def _run_bench(*args: str, timeout: float = 600) -> list[dict]:
    """Run the script as its users do (`python -m benchmarks.bench ...`); its JSON lines."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _check_row(row: dict) -> None:
    assert "error" not in row, row
    if "skipped" in row:  # only torch.compile is skipped in smoke, always with its reason
        assert bench.CASES[row["case"]].compile and "torch.compile" in row["skipped"], row
        return
    for key in ("step_ms", "tokens_per_s", "mfu", "flops_per_token", "peak_mem_gib", "loss"):
        assert isinstance(row[key], (int, float)) and math.isfinite(row[key]), (key, row)
    assert row["step_ms"] > 0 and row["tokens_per_s"] > 0 and row["peak_mem_gib"] > 0, row
    assert 0 < row["trainable"] <= row["params"], row
    if row["framework"] == "lora_jax":
        assert math.isfinite(row["compile_s"]) and row["compile_s"] > 0, row
    if bench.CASES[row["case"]].squad:
        assert row["loss_tokens"] < row["seq"], row


def test_smoke_runs_every_case(tmp_path):
    out = tmp_path / "smoke.jsonl"
    lines = _run_bench("--smoke", "--isolate", "none", "--peak-tflops", "0.01", "--out", str(out),
                       "--cases", *bench.CASES)
    env, rows = lines[0], lines[1:]
    assert env["env"] and env["versions"]["jax"] and env["command"].startswith("python -m benchmarks.bench")
    assert {(r["model"], r["case"]) for r in rows} == {(m, c) for m in MODELS for c in bench.CASES}
    for row in rows:
        _check_row(row)
    assert [json.loads(x) for x in out.read_text().splitlines()] == lines
    table = out.with_suffix(".md").read_text()
    assert "Smoke run" in table and table.count("| gpt2 |") >= len(bench.CASES)


def test_isolated_cases_and_compile_cache(tmp_path):
    """The default mode: each case in its own worker process (JAX and PEFT); the first worker
    compiles cold and fills the cache, the second reads its step from it and says so; the layer
    flags (--scan, --remat) reach the worker."""
    cache = tmp_path / "jax-cache"
    lines = _run_bench("--smoke", "--models", "gpt2", "--cases", "lora", "lora", "squad-peft", "--scan", "--remat",
                       "--peak-tflops", "0.01", "--compile-cache", str(cache))
    rows = lines[1:]
    assert [r["case"] for r in rows] == ["lora", "lora", "squad-peft"]
    for row in rows:
        _check_row(row)
    assert rows[0]["layers"] == "scan" and rows[0]["remat"] == "dots_saveable"
    assert any(cache.iterdir()), "the persistent compilation cache stayed empty"
    assert [r["compile_cache"] for r in rows[:2]] == ["miss", "hit"]


def _fake_row(spec, timeout):
    return dict(model=spec.model, case=spec.case, batch=spec.batch, seq=spec.seq, loss_tokens=spec.loss_tokens,
                smoke=False, tokens_per_s=1.0, timeout=timeout)


def test_out_keeps_finished_cases_when_the_run_dies(tmp_path, monkeypatch):
    """A GPU call killed at its time limit must still hand back the cases it finished."""
    calls = []

    def run(spec, timeout):
        calls.append(spec.case)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the call's time limit, as the second case runs
        return _fake_row(spec, timeout)

    monkeypatch.setattr(bench, "run_isolated", run)
    out = tmp_path / "gpu" / "bloom.jsonl"
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--models", "bloom-560m", "--cases", "lora", "full", "--out", str(out)])
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines[0]["env"] and [x["case"] for x in lines[1:]] == ["lora"]


def test_budget_caps_case_timeouts_and_skips_what_no_longer_fits(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(bench.time, "monotonic", lambda: clock[0])

    def run(spec, timeout):
        clock[0] += 60  # each case takes a minute
        return _fake_row(spec, timeout)

    monkeypatch.setattr(bench, "run_isolated", run)
    rows = bench.main(["--models", "gpt2", "--cases", "lora", "full", "peft", "--budget", "100",
                       "--case-timeout", "90"])
    assert [r.get("timeout") for r in rows] == [90, 40, None]
    assert "time budget" in rows[2]["skipped"]


def test_cache_hit_rows_do_not_stand_in_for_the_cold_compile():
    env = dict(date="d", python="3", versions={}, command="python -m benchmarks.bench")
    base = dict(model="bloom-560m", case="lora", batch=16, seq=512, loss_tokens=512, smoke=False,
                tokens_per_s=1e5, device="NVIDIA H100 80GB HBM3")
    rows = [dict(base, compile_s=41.0, compile_cache="miss"), dict(base, compile_s=3.2, compile_cache="hit")]
    got = {what: res for model, what, res in bench.check_targets(rows) if model == "bloom-560m"}
    assert got["lora cold compile <= 30 s"] == "FAIL"
    assert got["lora compile from the persistent cache < 5 s"] == "pass"
    assert "persistent compilation cache hit" in bench.markdown(env, rows)


def test_recorded_command_names_the_settings_it_ran_under(monkeypatch):
    monkeypatch.delenv("JAX_DEFAULT_PRNG_IMPL", raising=False)
    monkeypatch.delenv("JAX_THREEFRY_PARTITIONABLE", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_command_buffer=FUSION,CUBLAS")
    assert bench.environment(["--models", "gpt2"])["command"] == (
        "XLA_FLAGS=--xla_gpu_enable_command_buffer=FUSION,CUBLAS python -m benchmarks.bench --models gpt2")
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setenv("JAX_DEFAULT_PRNG_IMPL", "unsafe_rbg")
    assert bench.environment([])["command"] == "JAX_DEFAULT_PRNG_IMPL=unsafe_rbg python -m benchmarks.bench "


def test_a_remat_or_scan_row_does_not_stand_in_for_the_default_step():
    base = dict(model="gpt2", batch=16, seq=1024, loss_tokens=1024, smoke=False, layers="unrolled", remat=None,
                peak_mem_gib=7.0, device="NVIDIA H100 80GB HBM3")
    rows = [dict(base, case="lora", tokens_per_s=600e3), dict(base, case="full", tokens_per_s=400e3),
            dict(base, case="lora", tokens_per_s=500e3, remat="dots_saveable"),
            dict(base, case="lora", tokens_per_s=300e3, layers="scan")]
    got = {what: res for model, what, res in bench.check_targets(rows) if model == "gpt2"}
    assert got["lora tokens/s >= 595k"] == "pass" and got["lora >= 1.3x full fine-tuning"] == "pass"
    assert ("gpt2", "lora", "full", 1.5) in bench.ratios(rows)


def test_markdown_keeps_an_error_in_its_row():
    env = dict(date="d", python="3", versions={}, command="python -m benchmarks.bench")
    err = "ImportError: huggingface-hub>=1.5.0,<2.0 is required\nTry: `pip install a | b`"
    rows = [dict(model="gpt2", case="peft", batch=16, seq=1024, loss_tokens=1024, smoke=False, error=err)]
    table = bench.markdown(env, rows)
    line, = [x for x in table.splitlines() if "ImportError" in x]
    assert line.startswith("| gpt2 | peft |") and line.endswith("|") and "pip install a" in line
    assert len(re.split(r"(?<!\\)\|", line)) == 12  # 10 cells: no unescaped pipe from the message


def _compile(case: str):
    """Compile the GPT-2-124M train step of `case` from shapes only (nothing allocated)."""
    import jax

    # fp32 on CPU: a bf16 step would add CPU-only fp32 copies of the frozen weights to its temps.
    # Unrolled: XLA's cost analysis counts a while-loop (scanned layer) body once.
    spec = bench.Spec(model="gpt2", case=case, batch=1, seq=128, dtype="float32", scan=False)
    step, args, info = bench.build_jax_step(spec, abstract=True)
    lowered = jax.jit(step, donate_argnums=(0, 2)).lower(*args)
    # LLVM's optimisation level changes neither the HLO FLOP count nor the buffer plan.
    compiled = lowered.compile(compiler_options={"xla_backend_optimization_level": 0})
    return compiled, info


def test_lora_step_flops_and_memory_vs_full_finetuning():
    lora, info = _compile("lora")
    full, _ = _compile("full")
    f_lora, f_full = bench.compiled_flops(lora), bench.compiled_flops(full)
    m_lora, m_full = bench.compiled_bytes(lora), bench.compiled_bytes(full)
    cfg, tokens = info["config"], 128
    expected = bench.flops_per_token(cfg, tokens, full=False) / bench.flops_per_token(cfg, tokens, full=True)
    mib = lambda m: {k: round(v / 2**20, 1) for k, v in m.items()}  # noqa: E731
    print(f"\nGPT-2 124M train step, batch 1 x seq 128, fp32, unrolled: "
          f"LoRA {f_lora / 1e9:.2f} GFLOP, full FT {f_full / 1e9:.2f} GFLOP, ratio {f_lora / f_full:.3f} "
          f"(4N+attn / 6N+attn = {expected:.3f})\n"
          f"compiled memory MiB: LoRA {mib(m_lora)}\n                     full {mib(m_full)}")
    assert f_lora / f_full <= 0.72
    assert m_lora["total"] < m_full["total"]
    assert m_lora["temp"] < m_full["temp"]


@pytest.mark.parametrize("case,bits", [("qlora", 4.5), ("int8-lora", 8 + 32 / 768)])
def test_qlora_step_keeps_lora_flops_with_a_quarter_of_the_weight_bytes(case, bits):
    """The `qlora` case (NF4 frozen linear weights) of the GPT-2 124M step: the same matmul FLOPs
    as LoRA give or take the dequantization, its 85M linear weights held in 4.5 bits instead of
    32, and no more temporaries than LoRA's; the `int8-lora` case likewise in 8 bits plus an fp32
    absmax per row of 768 (c_proj's rows of 3072 take less)."""
    lora, info = _compile("lora")
    qlora, _ = _compile(case)
    f_lora, f_q = bench.compiled_flops(lora), bench.compiled_flops(qlora)
    m_lora, m_q = bench.compiled_bytes(lora), bench.compiled_bytes(qlora)
    cfg = info["config"]
    linear = 12 * cfg.num_layers * cfg.hidden_size**2  # c_attn 3D^2, attn c_proj D^2, mlp 2 x 4D^2
    print(f"\nGPT-2 124M, batch 1 x seq 128, fp32: {case} {f_q / 1e9:.2f} GFLOP vs LoRA {f_lora / 1e9:.2f}; "
          f"arguments {m_q['argument'] / 2**20:.0f} vs {m_lora['argument'] / 2**20:.0f} MiB, "
          f"temp {m_q['temp'] / 2**20:.0f} vs {m_lora['temp'] / 2**20:.0f} MiB")
    assert f_lora <= f_q <= 1.05 * f_lora
    saved = m_lora["argument"] - m_q["argument"]
    assert saved >= linear * (4 - bits / 8) * 0.99  # fp32 -> 4 bits + an fp32 absmax per 64 (int8: per row)
    assert m_q["temp"] <= m_lora["temp"]


def test_gpu_check_runs_its_comparison():
    """benchmarks/gpu_check.py (cuDNN against XLA on a GPU) runs end to end here as XLA against XLA."""
    from benchmarks import gpu_check

    assert gpu_check.main(["--impl", "xla", "--models", "bloom"]) == 0


def test_profile_sums_gpu_kernels_per_name(tmp_path):
    """benchmarks/profile.py reads the GPU streams of a perfetto trace, not the host's."""
    import gzip

    from benchmarks import profile

    events = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
        {"ph": "X", "name": "gemm_fusion_dot_1", "pid": 2, "dur": 30.0},
        {"ph": "X", "name": "gemm_fusion_dot_1", "pid": 2, "dur": 20.0},
        {"ph": "X", "name": "loop_add_fusion", "pid": 2, "dur": 5.0},
        {"ph": "X", "name": "PjitFunction(step)", "pid": 1, "dur": 900.0},
    ]
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "perfetto_trace.json.gz").write_bytes(gzip.compress(json.dumps({"traceEvents": events}).encode()))
    assert profile.kernel_times(tmp_path) == {"gemm_fusion_dot_1": 50.0, "loop_add_fusion": 5.0}
