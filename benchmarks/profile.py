"""Where a lora_jax benchmark step spends its GPU time: the step of `benchmarks.bench` (same
`build_jax_step`), traced with `jax.profiler` for a few steps after warmup; GPU kernel times are
summed by kernel name per step and the largest printed, grouped into rough classes (matmul,
attention, fusion, random bits, copy...). The compiled HLO is written beside them, to look a
kernel up by name (the trace writes `gemm_fusion_dot_265` for the HLO's `gemm_fusion_dot.265`).

    python -m benchmarks.profile --models gpt2 --cases lora full --out DIR

Writes DIR/<name>.hlo.txt and DIR/<name>.kernels.json (kernel name -> ms per step), <name> being
<model>-<case>, with -dropout<p> when --lora-dropout is not the bench's 0.05.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import tempfile
from pathlib import Path

from benchmarks.bench import DEFAULT_SHAPES, Spec, build_jax_step

CLASSES = [  # first match wins; kernel names as cuBLAS / cuDNN / XLA call them
    ("attention", re.compile(r"fmha|flash|cudnn|sdpa|attn", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|sm90_xmma|nvjet|cublas|matmul|dot", re.I)),
    ("random bits", re.compile(r"threefry|rng|random", re.I)),
    ("copy / transpose", re.compile(r"copy|transpose|memcpy|memset", re.I)),
    ("reduce / fusion", re.compile(r"reduce|fusion|loop|input", re.I)),
]


def kernel_times(trace_dir: Path) -> dict[str, float]:
    """Total microseconds per GPU kernel name in the perfetto trace under `trace_dir`."""
    (path,) = list(trace_dir.rglob("perfetto_trace.json.gz"))
    events = json.loads(gzip.decompress(path.read_bytes()))
    events = events["traceEvents"] if isinstance(events, dict) else events
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                and re.search(r"GPU|gpu|device:", str(e.get("args", {}).get("name", "")))
                and "host" not in str(e.get("args", {}).get("name", "")).lower()}
    if not gpu_pids:
        names = [e.get("args", {}).get("name") for e in events if e.get("name") == "process_name"]
        print(f"no GPU timeline in the trace; its processes: {names}")
    totals: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in gpu_pids:
            totals[e["name"]] += float(e.get("dur", 0.0))
    return dict(totals)


def profile(model: str, case: str, steps: int, out: Path, smoke: bool, lora_dropout: float) -> None:
    import jax

    batch, seq = (2, 32) if smoke else DEFAULT_SHAPES[model]
    spec = Spec(model=model, case=case, batch=batch, seq=seq, smoke=smoke, lora_dropout=lora_dropout)
    step, args, _ = build_jax_step(spec)
    compiled = jax.jit(step, donate_argnums=(0, 2)).lower(*args).compile()
    name = f"{model}-{case}" + (f"-dropout{lora_dropout:g}" if lora_dropout != 0.05 else "")
    (out / f"{name}.hlo.txt").write_text(compiled.as_text())
    trainable, frozen, opt_state, batch_, rng = args
    del args
    for _ in range(3):
        trainable, opt_state, metrics = compiled(trainable, frozen, opt_state, batch_, rng)
    jax.block_until_ready(metrics)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(steps):
                trainable, opt_state, metrics = compiled(trainable, frozen, opt_state, batch_, rng)
            jax.block_until_ready(metrics)
        totals = kernel_times(Path(d))
    per_step = {k: v / steps / 1e3 for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}  # ms
    (out / f"{name}.kernels.json").write_text(json.dumps(per_step, indent=0))
    classes: collections.Counter[str] = collections.Counter()
    for kernel, ms in per_step.items():
        classes[next((c for c, rx in CLASSES if rx.search(kernel)), "other")] += ms
    print(f"\n== {model} {case} lora_dropout {lora_dropout:g}: GPU kernel time {sum(per_step.values()):.2f} ms per step; "
          + ", ".join(f"{c} {ms:.2f}" for c, ms in classes.most_common()))
    for kernel, ms in list(per_step.items())[:25]:
        print(f"  {ms:7.3f} ms  {kernel[:150]}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["gpt2"])
    p.add_argument("--cases", nargs="+", default=["lora"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--smoke", action="store_true", help="tiny configs (CPU: the script itself)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for model in args.models:
        for case in args.cases:
            try:
                profile(model, case, args.steps, args.out, args.smoke, args.lora_dropout)
            except Exception as e:  # one case's failure must not cost the others
                print(f"\n== {model} {case}: FAILED {type(e).__name__}: {str(e)[:1000]}")


if __name__ == "__main__":
    main()
