"""Train-step speed and memory: lora_jax LoRA (factored, merged), lora_jax full fine-tuning and
Hugging Face PEFT LoRA (eager, torch.compile), on GPT-2 124M and BLOOM-560m with random weights.

Run on one GPU (each case in its own subprocess, so peak memory never carries over; on an H100
GPT-2's nine cases took 6 minutes and BLOOM-560m's 8.4: `--budget` keeps a run inside a call's
time limit, and `--out` is written case by case; benchmarks/RESULTS.md has the exact calls):

    python -m benchmarks.bench --models gpt2 --out benchmarks/gpt2.jsonl --compile-cache /tmp/jax-cache --budget 540
    python -m benchmarks.bench --models bloom-560m --out benchmarks/bloom.jsonl --compile-cache /tmp/jax-cache --budget 540

CPU smoke run (tiny configs, batch 2 x seq 32, 2 steps; every code path, no performance figure):

    python -m benchmarks.bench --smoke

Output: one JSON line per case on stdout (and in `--out`), e.g.

    {"model": "gpt2", "case": "lora", "batch": 16, "seq": 1024, "tokens_per_s": 604000.0,
     "step_ms": 27.1, "mfu": 0.42, "peak_mem_gib": 8.0, "compile_s": 21.3, ...}

then a markdown table (also written to `<out>.md`), speed ratios, and the targets with pass/fail.

Cases (`--cases`): `lora` (factored), `lora-merged`, `full` (full fine-tuning), `peft`,
`peft-compile`; and SQuAD-shaped (`squad-lora`, `squad-peft`, `squad-peft-compile`): the loss
covers only the last `--answer-tokens` tokens of each row. lora_jax builds logits only there
(`train.loop.target_loss`); PEFT can only mask labels with -100, so transformers still builds
the full [B, T, V] logits and upcasts them to fp32 in its loss — that difference is the point
of the case, not an unfairness in the setup. Run only when named: QLoRA, the frozen linear
weights in 4-bit NF4 (`qlora`: `lora_jax.quant`; `peft-qlora`: transformers' bitsandbytes
4-bit model under PEFT, eager and without gradient checkpointing, as `peft`), and the same on
8-bit weights (`int8-lora`, `quant.quantize(scheme="int8")`; `peft-int8`, transformers'
`load_in_8bit` model).

FLOPs per token (MFU): LoRA 4*N + attention, full fine-tuning 6*N + attention, where N counts
the layer matmul weights plus the LM head (in SQuAD-shaped cases the head and the last layer's
attention, output and MLP products only at loss positions: the work the loss needs, for every
framework; adapters ignored) and attention is 3 * 4*L*T*D (QK^T and AV, forward + backward), as
`shared/bench/peft_anchor.py` counts. Peak: `--peak-tflops`, else a table by device kind.

Compile time: `compile_s` is trace + lower + XLA compile. `--compile-cache DIR` turns on JAX's
persistent compilation cache, and each row's `compile_cache` says whether its step was a cache
`miss` (a cold compile) or a `hit` (a cache read: the way to bring a second compile under 5 s;
`lower_s`, the tracing part, is never cached). Name a case twice (`--cases lora lora ...`) and
the second worker reads the first one's step; the targets take the cold figure from misses only.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import datetime
import importlib.metadata
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "BENCH_RESULT "  # marks the worker's result line among library chatter

# Dense bf16 peak TFLOP/s by a substring of the device kind (jax device_kind / torch name).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
DEFAULT_SHAPES = {"gpt2": (16, 1024), "bloom-560m": (16, 512)}  # (batch, seq) per model
FUSED_QKV = {"gpt2": "c_attn", "bloom": "query_key_value"}  # PEFT target names, by model_type
SMOKE_DIMS = dict(num_layers=2, hidden_size=64, num_heads=4, intermediate_size=256, vocab_size=512)
LR, WEIGHT_DECAY = 2e-4, 0.01  # peft_anchor.py's AdamW


@dataclasses.dataclass(frozen=True)
class Case:
    """What one case runs: framework, LoRA or full fine-tuning, and how the loss is taken."""

    framework: str  # "jax" or "peft"
    mode: str  # "lora" or "full"
    strategy: str | None = None  # lora_jax.apply strategy
    compile: bool = False  # torch.compile (PEFT)
    squad: bool = False  # loss on the last answer tokens only
    quant: str | None = None  # frozen linear weights quantized: "nf4" (QLoRA) or "int8" (load_in_8bit)


CASES: dict[str, Case] = {
    "lora": Case("jax", "lora", "factored"),
    "lora-merged": Case("jax", "lora", "merged"),
    "full": Case("jax", "full"),
    "peft": Case("peft", "lora"),
    "peft-compile": Case("peft", "lora", compile=True),
    "squad-lora": Case("jax", "lora", "factored", squad=True),
    "squad-peft": Case("peft", "lora", squad=True),
    "squad-peft-compile": Case("peft", "lora", compile=True, squad=True),
    "qlora": Case("jax", "lora", "factored", quant="nf4"),
    "peft-qlora": Case("peft", "lora", quant="nf4"),
    "int8-lora": Case("jax", "lora", "factored", quant="int8"),
    "peft-int8": Case("peft", "lora", quant="int8"),
}
DEFAULT_CASES = [c for c, case in CASES.items() if not case.quant]  # the issue's cases; quantized ones on request


@dataclasses.dataclass(frozen=True)
class Spec:
    """Everything a worker needs for one case (JSON-serialisable: it crosses a process boundary)."""

    model: str  # a GPT2Config / BloomConfig preset name
    case: str
    batch: int
    seq: int
    dtype: str = "auto"  # compute dtype; "auto": bfloat16 on an accelerator, float32 on CPU
    scan: bool = False
    remat: str | None = None  # a jax.checkpoint_policies name, "none" for plain remat, None: off
    steps: int = 20
    warmup: int = 3
    answer_tokens: int = 16
    rank: int = 16
    alpha: float = 32.0
    lora_dropout: float = 0.05
    smoke: bool = False
    peak_tflops: float | None = None
    compile_cache: str | None = None
    compile_backend: str = "inductor"

    @property
    def loss_tokens(self) -> int:
        """Loss positions per row."""
        return min(self.answer_tokens, self.seq) if CASES[self.case].squad else self.seq


# ----------------------------------------------------------------------------- shared pieces


def model_config(spec: Spec, *, param_dtype: Any = "float32", compute_dtype: Any = "float32"):
    """The lora_jax model config of `spec` (real preset sizes, or tiny ones with `smoke`)."""
    from lora_jax.models import BloomConfig, GPT2Config

    cls = BloomConfig if spec.model.startswith("bloom") else GPT2Config
    over: dict[str, Any] = {}
    if spec.smoke:
        over.update(SMOKE_DIMS)
        if cls is GPT2Config:  # keep special ids inside the tiny vocabulary
            over.update(bos_token_id=0, eos_token_id=0, max_position_embeddings=max(64, spec.seq))
    remat = spec.remat is not None
    policy = None if spec.remat in (None, "none") else spec.remat
    return cls.preset(spec.model, **over, param_dtype=param_dtype, compute_dtype=compute_dtype,
                      scan_layers=spec.scan, remat=remat, remat_policy=policy)


def _trimmed(cfg: Any, loss_fraction: float) -> float:
    """The share of the last layer's tokens whose output and MLP products and attention no loss
    needs: those outside it (`CausalLM.apply(positions=)` skips them with unrolled layers)."""
    return 0.0 if cfg.num_layers == 0 else 1.0 - loss_fraction


def matmul_params(cfg: Any, loss_fraction: float = 1.0) -> float:
    """N per token: layer matmul weights (QKV, out, MLP in/out) + the LM head at the loss positions,
    less the last layer's out and MLP weights at the other positions (`_trimmed`)."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    layers = cfg.num_layers * (4 * d * d + 2 * d * f) - (d * d + 2 * d * f) * _trimmed(cfg, loss_fraction)
    return layers + cfg.vocab_size * d * loss_fraction


def flops_per_token(cfg: Any, seq: int, *, full: bool, loss_fraction: float = 1.0) -> float:
    """Model FLOPs per trained token: (6 if full else 4) * N + 3 * 4*L*T*D attention (the last
    layer's at the loss positions only, as its MLP)."""
    attention = 3 * 4 * (cfg.num_layers - _trimmed(cfg, loss_fraction)) * seq * cfg.hidden_size
    return (6 if full else 4) * matmul_params(cfg, loss_fraction) + attention


def device_peak(kind: str, override_tflops: float | None) -> float | None:
    """Peak FLOP/s: the flag, else the table entry whose key occurs in the device kind."""
    if override_tflops:
        return override_tflops * 1e12
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in kind.upper()), None)


def timing_fields(spec: Spec, cfg: Any, times: list[float], device: str) -> dict[str, Any]:
    """Median step, tokens/s and MFU from the timed steps (seconds)."""
    step_s = statistics.median(times)
    tokens_per_s = spec.batch * spec.seq / step_s
    fpt = flops_per_token(cfg, spec.seq, full=CASES[spec.case].mode == "full",
                          loss_fraction=spec.loss_tokens / spec.seq)
    peak = device_peak(device, spec.peak_tflops)
    return dict(step_ms=step_s * 1e3, tokens_per_s=tokens_per_s, flops_per_token=fpt,
                mfu=None if peak is None else fpt * tokens_per_s / peak)


def compiled_flops(compiled: Any) -> float:
    """XLA's FLOP count of a compiled program (a while-loop body counts once)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older JAX: a list per module
    return float(cost["flops"])


def compiled_bytes(compiled: Any) -> dict[str, int]:
    """XLA's static memory plan: arguments + outputs - donated aliases + temporaries."""
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return dict(temp=m.temp_size_in_bytes, argument=m.argument_size_in_bytes,
                output=m.output_size_in_bytes, alias=m.alias_size_in_bytes, total=total)


def enable_compile_cache(path: str) -> None:
    """JAX persistent compilation cache in `path`; every program is cached (no size/time floor).

    Must run before the process's first compilation: JAX decides once whether the cache is used.
    """
    import jax

    Path(path).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# ----------------------------------------------------------------------------- lora_jax cases


def resolve_jax_dtype(name: str) -> Any:
    import jax
    import jax.numpy as jnp

    if name == "auto":
        return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    return jnp.dtype(name)


def build_jax_step(spec: Spec, *, abstract: bool = False) -> tuple[Callable, tuple, dict[str, Any]]:
    """The train step of a lora_jax case and its inputs, from `train.loop`.

    Frozen weights are stored in the compute dtype for LoRA; full fine-tuning keeps fp32 master
    weights and computes in the compute dtype (as PEFT's full-FT anchor does with autocast).

    Args:
      spec: the case (framework "jax").
      abstract: inputs as `jax.ShapeDtypeStruct`s (nothing allocated; for lower/cost analysis).
    Returns:
      (step, (trainable, frozen, opt_state, batch, rng), info); `step` is not jitted yet, jit it
      with donate_argnums=(0, 2) (trainable and optimizer state).
    """
    import jax
    import jax.numpy as jnp

    import lora_jax as lj
    from lora_jax import quant
    from lora_jax.models import CausalLM
    from train import loop

    case = CASES[spec.case]
    compute = resolve_jax_dtype(spec.dtype)
    full = case.mode == "full"
    cfg = model_config(spec, param_dtype=jnp.float32 if full else compute, compute_dtype=compute)
    model = CausalLM(cfg)
    key = jax.random.key(0)
    params = model.param_shapes() if abstract else model.init_params(key)
    if case.quant:
        q = functools.partial(quant.quantize, scheme=case.quant)
        params = jax.eval_shape(q, params) if abstract else q(params)
    # Rows are unpadded, so the mask is left out: the model then uses causal attention, the
    # cuDNN fast path (peft_anchor.py passes no attention mask either).
    if full:
        trainable, frozen = {"adapters": {}, "params": params}, jax.tree.map(lambda _: None, params)
        lora = None

        def logits(p, a, ids, mask, rng, pos):
            return model.apply(p, ids, None, positions=pos, vocab_multiple=loop.VOCAB_MULTIPLE)
    else:
        # The merged strategy cannot apply LoRA dropout; it runs without.
        dropout = spec.lora_dropout if case.strategy == "factored" else 0.0
        lora = lj.LoraConfig(rank=spec.rank, alpha=spec.alpha, targets=(FUSED_QKV[cfg.model_type],),
                             dropout=dropout)
        make = lambda p: lj.init(lora, p, jax.random.fold_in(key, 1))  # noqa: E731
        adapters = jax.eval_shape(make, params) if abstract else make(params)
        trainable, frozen = lj.split(lora, params, adapters)
        g = lj.apply(model.apply, lora, strategy=case.strategy)

        def logits(p, a, ids, mask, rng, pos):
            return g(p, a, ids, None, positions=pos, lora_rng=rng if dropout > 0 else None,
                     vocab_multiple=loop.VOCAB_MULTIPLE)

    targets = spec.loss_tokens
    tx = loop.make_optimizer(LR, steps=1000, warmup=10, weight_decay=WEIGHT_DECAY, clip=1.0)
    step = loop.make_step(loop.target_loss(logits, targets), tx,
                          loop.StepConfig(accum=1, micro_batch=spec.batch))
    shape = (1, spec.batch, spec.seq)  # [accum, micro, T]
    if abstract:
        opt_state = jax.eval_shape(tx.init, trainable)
        ids = jax.ShapeDtypeStruct(shape, jnp.int32)
        batch = dict(input_ids=ids, attention_mask=ids, labels=ids,
                     loss_mask=jax.ShapeDtypeStruct(shape, jnp.float32))
        rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(1)))
    else:
        opt_state = tx.init(trainable)
        k1, k2 = jax.random.split(jax.random.key(2))
        loss_mask = jnp.zeros(shape, jnp.float32).at[..., spec.seq - targets:].set(1.0)  # answer at row end
        batch = dict(input_ids=jax.random.randint(k1, shape, 0, cfg.vocab_size, jnp.int32),
                     attention_mask=jnp.ones(shape, jnp.int32),
                     labels=jax.random.randint(k2, shape, 0, cfg.vocab_size, jnp.int32), loss_mask=loss_mask)
        rng = jax.random.key_data(jax.random.key(1))  # make_step takes raw key data
    counts = lj.summary(lora, params, adapters) if lora is not None else None
    total = counts.total if counts else sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    info = dict(config=cfg, params=total, trainable=counts.trainable if counts else total,
                lora_dropout=lora.dropout if lora else None)
    return step, (trainable, frozen, opt_state, batch, rng), info


def run_jax_case(spec: Spec) -> dict[str, Any]:
    """Compile (cold, timed), run warmup + timed steps, read peak memory."""
    import jax

    if spec.compile_cache:
        enable_compile_cache(spec.compile_cache)
    step, args, info = build_jax_step(spec)
    events: list[str] = []
    listen = lambda event, **_: events.append(event)  # noqa: E731
    t0 = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=(0, 2)).lower(*args)
    t1 = time.perf_counter()
    jax.monitoring.register_event_listener(listen)
    try:
        compiled = lowered.compile()
    finally:
        jax.monitoring.unregister_event_listener(listen)
    t2 = time.perf_counter()
    # A cold compile and a persistent-cache read are different measurements: say which this was.
    cache = None if not spec.compile_cache else "hit" if "/jax/compilation_cache/cache_hits" in events else "miss"
    trainable, frozen, opt_state, batch, rng = args
    del args  # the donated buffers must not be referenced again
    times, metrics = [], None
    for i in range(spec.warmup + spec.steps):
        t = time.perf_counter()
        trainable, opt_state, metrics = compiled(trainable, frozen, opt_state, batch, rng)
        jax.block_until_ready(metrics)
        if i >= spec.warmup:
            times.append(time.perf_counter() - t)
    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    plan = compiled_bytes(compiled)
    try:  # a side figure: a backend whose cost analysis lacks it must not cost the measured row
        xla_flops = compiled_flops(compiled)
    except (KeyError, TypeError, IndexError):
        xla_flops = None
    if "peak_bytes_in_use" in stats:
        peak, source = stats["peak_bytes_in_use"], "device peak"
    else:  # CPU: no allocator statistics; the compiled memory plan of the step instead
        peak, source = plan["total"], "compiled plan"
    case = CASES[spec.case]
    return dict(
        framework="lora_jax", strategy=case.strategy, device=dev.device_kind, platform=dev.platform,
        dtype=str(resolve_jax_dtype(spec.dtype)), layers="scan" if spec.scan else "unrolled",
        remat=spec.remat, **timing_fields(spec, info["config"], times, dev.device_kind),
        peak_mem_gib=peak / 2**30, mem_source=source, compiled_temp_gib=plan["temp"] / 2**30,
        compile_s=t2 - t0, lower_s=t1 - t0, xla_compile_s=t2 - t1, compile_cache=cache,
        # XLA counts a scanned layer once, so the figure only means something unrolled.
        xla_flops_per_token=None if spec.scan or xla_flops is None else xla_flops / (spec.batch * spec.seq),
        params=info["params"], trainable=info["trainable"], lora_dropout=info["lora_dropout"],
        loss=float(metrics["loss"]),
    )


# ----------------------------------------------------------------------------- PEFT cases


def hf_config(cfg: Any) -> Any:
    """A transformers config object for the lora_jax config (no hub access)."""
    from transformers import AutoConfig

    d = cfg.to_hf()
    model_type = d.pop("model_type")
    d.pop("architectures", None)
    hc = AutoConfig.for_model(model_type, **d)
    # As peft_anchor.py: SDPA for GPT-2; transformers 5 BLOOM has no SDPA path, only eager.
    hc._attn_implementation = "sdpa" if model_type == "gpt2" else "eager"
    return hc


def run_peft_case(spec: Spec) -> dict[str, Any]:
    """PEFT LoRA on the transformers PyTorch model, set up as shared/bench/peft_anchor.py does."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    case = CASES[spec.case]
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    name = "float32" if spec.dtype == "auto" and not cuda else ("bfloat16" if spec.dtype == "auto" else spec.dtype)
    dtype = getattr(torch, name)
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = model_config(spec)
    model = AutoModelForCausalLM.from_config(hf_config(cfg))  # random init, train mode
    if case.quant:  # bitsandbytes quantizes while loading: go through a checkpoint
        from transformers import BitsAndBytesConfig

        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype) \
            if case.quant == "nf4" else BitsAndBytesConfig(load_in_8bit=True)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            model = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=qc, dtype=dtype, device_map=dev,
                                                         attn_implementation=hf_config(cfg)._attn_implementation)
        model.train()
    else:
        model = model.to(dtype).to(dev)
    lcfg = peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.lora_dropout,
                           target_modules=[FUSED_QKV[cfg.model_type]], task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lcfg)
    # a 4-bit parameter's numel() counts packed bytes; its quant_state knows the real shape
    n_params = sum(p.quant_state.shape.numel() if getattr(p, "quant_state", None) is not None else p.numel()
                   for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR,
                            weight_decay=WEIGHT_DECAY, fused=cuda)
    step_model = torch.compile(model, backend=spec.compile_backend) if case.compile else model
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, cfg.vocab_size, (spec.batch, spec.seq), generator=g).to(dev)
    labels = x.clone()
    if case.squad:  # PEFT can only mask labels: the model still builds every position's logits
        labels[:, : spec.seq - spec.loss_tokens] = -100
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step() -> Any:
        with torch.autocast(dev, dtype=dtype, enabled=dtype != torch.float32):
            out = step_model(input_ids=x, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    times, loss = [], None
    for i in range(spec.warmup + spec.steps):
        if i == spec.warmup and cuda:
            torch.cuda.reset_peak_memory_stats()  # steady-state peak, as peft_anchor.py measures it
        t = time.perf_counter()
        loss = step()
        sync()
        dt = time.perf_counter() - t
        if i == 0:
            first = dt
        if i >= spec.warmup:
            times.append(dt)
    if cuda:
        peak, source, kind = torch.cuda.max_memory_allocated(), "device peak", torch.cuda.get_device_name()
    else:  # ru_maxrss is KiB on Linux: the whole process, interpreter and libraries included
        peak, source, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process RSS", "cpu"
    return dict(
        framework="peft", strategy="compile" if case.compile else "eager", device=kind, platform=dev,
        dtype=name, compile_backend=spec.compile_backend if case.compile else None,
        **timing_fields(spec, cfg, times, kind), peak_mem_gib=peak / 2**30, mem_source=source,
        compile_s=first if case.compile else None, first_step_s=first,
        params=n_params, trainable=n_train, lora_dropout=spec.lora_dropout, loss=float(loss),
    )


# ----------------------------------------------------------------------------- orchestration


def run_case(spec: Spec) -> dict[str, Any]:
    """One case in this process; an exception becomes an `error` row."""
    base = dict(model=spec.model, case=spec.case, batch=spec.batch, seq=spec.seq,
                loss_tokens=spec.loss_tokens, smoke=spec.smoke)
    t0 = time.perf_counter()
    try:
        runner = run_jax_case if CASES[spec.case].framework == "jax" else run_peft_case
        return {**base, **runner(spec), "wall_s": time.perf_counter() - t0}
    except Exception as e:  # record and go on with the other cases
        return {**base, "error": f"{type(e).__name__}: {e}"[:500]}


def run_isolated(spec: Spec, timeout: float) -> dict[str, Any]:
    """One case in a fresh interpreter, so its device memory peak is its own."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if CASES[spec.case].framework == "peft":
        env["JAX_PLATFORMS"] = "cpu"  # lora_jax.models imports JAX; keep it off the GPU torch uses
    cmd = [sys.executable, "-m", "benchmarks.bench", "--worker", json.dumps(dataclasses.asdict(spec))]
    base = dict(model=spec.model, case=spec.case, batch=spec.batch, seq=spec.seq,
                loss_tokens=spec.loss_tokens, smoke=spec.smoke)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**base, "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {**base, "error": f"worker exited {proc.returncode}: " + " | ".join(tail)[:500]}


def skip_reason(spec: Spec, on_cpu_smoke: bool) -> str | None:
    """Why a case is not run, or None."""
    if on_cpu_smoke and CASES[spec.case].compile and spec.compile_backend == "inductor":
        return ("torch.compile skipped in --smoke: inductor takes minutes on a shared CPU; "
                "--compile-backend eager exercises the path")
    return None


# Environment variables that change what a run measures (XLA's passes, the PRNG behind dropout):
# set ones go into the recorded command.
SETTINGS_ENV = ("XLA_FLAGS", "JAX_DEFAULT_PRNG_IMPL", "JAX_THREEFRY_PARTITIONABLE")


def environment(argv: Sequence[str]) -> dict[str, Any]:
    """Versions, date and the exact command, prefixed by the SETTINGS_ENV variables set (no device
    query: the parent keeps off the GPU)."""
    names = ["jax", "jaxlib", "flax", "optax", "quax", "torch", "transformers", "peft", "bitsandbytes"]
    versions = {}
    for n in names:
        try:
            versions[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            versions[n] = None
    return dict(env=True, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                python=platform.python_version(), host=platform.node(), versions=versions,
                command=" ".join([f"{k}={shlex.quote(os.environ[k])}" for k in SETTINGS_ENV if os.environ.get(k)]
                                 + ["python -m benchmarks.bench " + shlex.join(argv)]))


def _fmt(x: Any, spec: str) -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def variant(r: dict[str, Any]) -> str:
    """The row's case, suffixed with the layer variant it ran (`--scan`, `--remat`), so that a
    variant never stands in for the default unrolled step in ratios and targets."""
    bits = (["scan"] if r.get("layers") == "scan" else []) + ([f"remat {r['remat']}"] if r.get("remat") else [])
    return r["case"] + (f" ({', '.join(bits)})" if bits else "")


def ratios(rows: list[dict[str, Any]]) -> list[tuple[str, str, str, float]]:
    """(model, numerator case, denominator case, tokens/s ratio) for the comparisons that matter."""
    pairs = [("lora", "full"), ("lora", "peft"), ("lora", "peft-compile"), ("lora-merged", "lora"),
             ("squad-lora", "squad-peft"), ("squad-lora", "squad-peft-compile"), ("qlora", "peft-qlora"),
             ("qlora", "lora"), ("int8-lora", "peft-int8"), ("int8-lora", "lora")]
    tok = {(r["model"], variant(r)): r.get("tokens_per_s") for r in rows if "error" not in r and "skipped" not in r}
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for a, b in pairs:
            x, y = tok.get((model, a)), tok.get((model, b))
            if x and y:
                out.append((model, a, b, x / y))
    return out


TARGETS = [  # (model, what, goal): the issue's bar on an H100/H200 at the default shapes
    ("gpt2", "lora tokens/s >= 595k", lambda t: t["lora"]["tokens_per_s"] >= 595e3),
    ("bloom-560m", "lora tokens/s >= 177k", lambda t: t["lora"]["tokens_per_s"] >= 177e3),
    ("gpt2", "lora peak memory <= 7.8 GiB", lambda t: t["lora"]["peak_mem_gib"] <= 7.8),
    ("bloom-560m", "lora peak memory <= 19.8 GiB", lambda t: t["lora"]["peak_mem_gib"] <= 19.8),
    ("gpt2", "lora >= 1.3x full fine-tuning", lambda t: t["lora"]["tokens_per_s"] >= 1.3 * t["full"]["tokens_per_s"]),
    ("bloom-560m", "lora >= 1.3x full fine-tuning", lambda t: t["lora"]["tokens_per_s"] >= 1.3 * t["full"]["tokens_per_s"]),
    ("bloom-560m", "lora cold compile <= 30 s", lambda t: t["lora"]["compile_s"] <= 30),
    ("bloom-560m", "lora compile from the persistent cache < 5 s",
     lambda t: t["lora (cache hit)"]["compile_s"] < 5),
    ("gpt2", "squad-lora >= 2.5x squad-peft-compile",
     lambda t: t["squad-lora"]["tokens_per_s"] >= 2.5 * t["squad-peft-compile"]["tokens_per_s"]),
    ("bloom-560m", "squad-lora >= 2.5x squad-peft-compile",
     lambda t: t["squad-lora"]["tokens_per_s"] >= 2.5 * t["squad-peft-compile"]["tokens_per_s"]),
]


def check_targets(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(model, target, "pass"/"FAIL"/"n/a") — n/a off the default shapes, in smoke runs, or missing.

    A run whose step came from the persistent compilation cache counts as `<case> (cache hit)`:
    its compile time is a cache read, not the cold compile the other targets are about."""
    by: dict[str, dict[str, dict]] = {}
    for r in rows:
        if "error" not in r and "skipped" not in r and not r.get("smoke") \
                and DEFAULT_SHAPES.get(r["model"]) == (r["batch"], r["seq"]):
            key = f"{variant(r)} (cache hit)" if r.get("compile_cache") == "hit" else variant(r)
            by.setdefault(r["model"], {})[key] = r
    out = []
    for model, what, ok in TARGETS:
        try:
            out.append((model, what, "pass" if ok(by[model]) else "FAIL"))
        except (KeyError, TypeError):
            out.append((model, what, "n/a"))
    return out


def markdown(env: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The results as a markdown table, then the ratios and the target checks."""
    devices = sorted({r["device"] for r in rows if r.get("device")})
    smoke = any(r.get("smoke") for r in rows)
    lines = [f"Device: {', '.join(devices) or '—'}; date {env['date']}; python {env['python']}; "
             + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
             f"Command: `{env['command']}`", ""]
    if smoke:
        lines += ["**Smoke run (tiny configs): checks the code paths, not a performance figure.**", ""]
    lines += ["| model | case | batch x seq | tokens/s | step ms | MFU | peak GiB | memory source "
              "| compile s | notes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        note = r.get("error") or r.get("skipped") or ""
        if not note:
            bits = [r.get("dtype"), r.get("layers"), r.get("strategy")]
            if r.get("compile_backend") not in (None, "inductor"):
                bits.append(f"torch.compile backend {r['compile_backend']}")
            if r.get("remat"):
                bits.append(f"remat {r['remat']}")
            if r["loss_tokens"] != r["seq"]:
                bits.append(f"loss on last {r['loss_tokens']} tokens")
            if r.get("compile_cache"):
                bits.append(f"persistent compilation cache {r['compile_cache']}")
            note = ", ".join(b for b in bits if b)
        note = " ".join(str(note).split()).replace("|", "\\|")  # one table row, whatever an error says
        mfu = r.get("mfu")
        lines.append(
            f"| {r['model']} | {r['case']} | {r['batch']} x {r['seq']} | {_fmt(r.get('tokens_per_s'), ',.0f')} "
            f"| {_fmt(r.get('step_ms'), '.2f')} | {_fmt(None if mfu is None else 100 * mfu, '.1f')}{'%' if mfu is not None else ''} "
            f"| {_fmt(r.get('peak_mem_gib'), '.3f')} | {r.get('mem_source', '—')} | {_fmt(r.get('compile_s'), '.1f')} "
            f"| {note} |")
    rs = [] if smoke else ratios(rows)  # tiny-config ratios would only mislead
    if rs:
        lines += ["", "Tokens/s ratios: " + "; ".join(f"{m} {a} / {b} = {x:.2f}x" for m, a, b, x in rs)]
    lines += ["", "| model | target | result |", "|---|---|---|"]
    lines += [f"| {m} | {w} | {s} |" for m, w, s in check_targets(rows)]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["gpt2", "bloom-560m"],
                   help="GPT-2 / BLOOM preset names (default: gpt2 bloom-560m)")
    opt_in = ", ".join(c for c in CASES if c not in DEFAULT_CASES)
    p.add_argument("--cases", nargs="+", default=DEFAULT_CASES, choices=list(CASES), metavar="CASE",
                   help=f"cases to run: {', '.join(CASES)} (default: all but {opt_in})")
    p.add_argument("--steps", type=int, help="timed steps per case (default 20; smoke 2)")
    p.add_argument("--warmup", type=int, help="untimed steps after compiling (default 3; smoke 1)")
    p.add_argument("--batch", type=int, help="rows per step (default: 16; smoke 2)")
    p.add_argument("--seq", type=int, help="tokens per row (default: gpt2 1024, bloom-560m 512; smoke 32)")
    p.add_argument("--answer-tokens", type=int, help="loss tokens per row in squad-* cases (default 16; smoke 8)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="compute dtype (auto: bfloat16 on GPU, float32 on CPU and in --smoke)")
    layers = p.add_mutually_exclusive_group()
    layers.add_argument("--scan", dest="scan", action="store_true", help="lax.scan over layers (fast compile)")
    layers.add_argument("--unroll", dest="scan", action="store_false", help="unrolled layers (default; fastest)")
    p.set_defaults(scan=False)
    p.add_argument("--remat", nargs="?", const="dots_saveable", default=None, metavar="POLICY",
                   help="rematerialise each layer; POLICY is a jax.checkpoint_policies name "
                        "(default with the flag: dots_saveable; 'none': save nothing)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: by device kind)")
    p.add_argument("--compile-cache", metavar="DIR", help="JAX persistent compilation cache directory "
                   "(the second run's compile becomes a cache read)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    p.add_argument("--isolate", choices=["case", "none"], default="case",
                   help="'case': each case in its own subprocess (default; needed for memory peaks); "
                        "'none': all in this process (CPU smoke tests)")
    p.add_argument("--case-timeout", type=float, default=900.0, help="seconds per isolated case")
    p.add_argument("--budget", type=float, metavar="SECONDS",
                   help="wall time for the whole run: no case starts after it is spent, and an isolated "
                        "case's timeout is cut to what is left, so the run ends with its table inside a "
                        "call's time limit (cases left out get a 'skipped' row)")
    p.add_argument("--smoke", action="store_true", help="tiny configs on CPU: every code path, no figures")
    p.add_argument("--out", type=Path, help="write JSON lines here and the markdown table to <out>.md")
    p.add_argument("--from-jsonl", nargs="+", type=Path, metavar="FILE",
                   help="run nothing: one table from the JSON lines of earlier runs (e.g. one per model)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one Spec (JSON) and print its row
    args = p.parse_args(argv)
    for name in ("steps", "batch", "seq", "answer_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def make_specs(args: argparse.Namespace) -> list[Spec]:
    """One Spec per (model, case), with the smoke / per-model defaults filled in."""
    specs = []
    for model in args.models:
        batch, seq = (2, 32) if args.smoke else DEFAULT_SHAPES.get(model, (16, 512))
        for case in args.cases:
            specs.append(Spec(
                model=model, case=case, batch=args.batch or batch, seq=args.seq or seq,
                dtype="float32" if args.smoke and args.dtype == "auto" else args.dtype,
                scan=args.scan, remat=args.remat,
                steps=args.steps or (2 if args.smoke else 20),
                warmup=args.warmup if args.warmup is not None else (1 if args.smoke else 3),
                answer_tokens=args.answer_tokens or (8 if args.smoke else 16),
                rank=args.rank, alpha=args.alpha, lora_dropout=args.lora_dropout, smoke=args.smoke,
                peak_tflops=args.peak_tflops, compile_cache=args.compile_cache,
                compile_backend=args.compile_backend))
    return specs


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the cases; print JSON lines, then the markdown table. Returns the case rows."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        row = run_case(Spec(**json.loads(args.worker)))
        print(RESULT_PREFIX + json.dumps(row), flush=True)
        return [row]
    env = environment(argv)  # the command as typed, before smoke's own flag below
    if args.smoke and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
        # Smoke figures mean nothing, so skip LLVM's optimisation passes: XLA:CPU compiles ~4x
        # faster. Workers inherit it; in a process whose JAX backend already started it is moot.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    if args.isolate == "none":
        # JAX and torch share the process: JAX must not preallocate the GPU torch needs.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        if args.compile_cache:
            enable_compile_cache(args.compile_cache)
    rows: list[dict[str, Any]] = []
    if args.from_jsonl:
        commands = []
        for path in args.from_jsonl:
            lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            env = next((x for x in lines if x.get("env")), env)  # the recorded run's versions
            commands.append(env["command"])
            rows += [x for x in lines if "case" in x]
        env = {**env, "command": " && ".join(dict.fromkeys(commands))}
        table = markdown(env, rows)
        print(table, flush=True)
        if args.out:
            args.out.with_suffix(".md").write_text(table)
        return rows
    print(json.dumps(env), flush=True)
    if args.out:  # written line by line: a run killed at a time limit keeps the cases it finished
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(env) + "\n")
    deadline = None if args.budget is None else time.monotonic() + args.budget
    for spec in make_specs(args):
        left = math.inf if deadline is None else deadline - time.monotonic()
        reason = skip_reason(spec, args.smoke) or (f"time budget ({args.budget:.0f} s) spent" if left <= 0 else None)
        if reason:
            row = dict(model=spec.model, case=spec.case, batch=spec.batch, seq=spec.seq,
                       loss_tokens=spec.loss_tokens, smoke=spec.smoke, skipped=reason)
        elif args.isolate == "none":
            row = run_case(spec)
        else:
            row = run_isolated(spec, min(args.case_timeout, left))
        print(json.dumps(row), flush=True)
        rows.append(row)
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
    table = markdown(env, rows)
    print(table, flush=True)
    if args.out:
        args.out.with_suffix(".md").write_text(table)
    return rows


if __name__ == "__main__":
    main()
