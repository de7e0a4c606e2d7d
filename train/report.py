"""What a user sees: progress bar, log lines, metrics.jsonl, loss plot, the results table."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


def logger(quiet_bar: bool) -> Callable[[str], None]:
    """A print that does not tear the progress bar."""
    return print if quiet_bar else tqdm.write


def progress(total: int, initial: int, tag: str, *, disable: bool):
    return tqdm(total=total, initial=initial, desc=f"train {tag}", unit="step", disable=disable, dynamic_ncols=True)


def json_line(record: Mapping[str, Any]) -> str:
    return json.dumps(record, sort_keys=True) + "\n"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl; a last line cut short by a crash mid-append (no newline) is left out."""
    if not path.exists():
        return []
    lines = path.read_text().split("\n")
    rows = [json.loads(line) for line in lines[:-1] if line.strip()]
    try:
        return rows + ([json.loads(lines[-1])] if lines[-1].strip() else [])
    except json.JSONDecodeError:
        return rows


def drop_metrics_after(path: Path, run: str, step: int) -> None:
    """Remove `run`'s rows of steps after `step` from metrics.jsonl (a run resumed from `step`
    logs them again), and a last row cut short by a crash (the resumed run appends after it), atomically."""
    rows = read_metrics(path)
    kept = [r for r in rows if r.get("run") != run or r.get("step", 0) <= step]
    torn = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    if len(kept) < len(rows) or torn:
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json_line(r) for r in kept))
        tmp.replace(path)


def loss_plot(metrics: Path, png: Path) -> None:
    """Training loss against step, one line per run (lora / full); the validation loss
    (--eval-every) dashed in the same colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for run in dict.fromkeys(r["run"] for r in rows):
        pts = [(r["step"], r["loss"]) for r in rows if r["run"] == run and "loss" in r]
        (line,) = ax.plot(*zip(*pts), label=run)
        val = [(r["step"], r["val_loss"]) for r in rows if r["run"] == run and "val_loss" in r]
        if val:
            ax.plot(*zip(*val), "--o", color=line.get_color(), markersize=3, label=f"{run} (validation)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (answer tokens)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(png)


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB"


def table(summary: Mapping[str, Any], samples: Mapping[str, Mapping[str, str]], records: Sequence[Any],
          n_samples: int = 3) -> str:
    """The final report: EM/F1 per model, trainable parameters, adapter size, wall time, samples."""
    scores = summary["scores"]
    quantized = summary.get("quantize")  # QLoRA: the base weights the scores come from are quantized
    tags = [quantized, summary.get("init") if summary.get("init") not in (None, "kaiming_uniform") else None,
            summary.get("loraplus_ratio") and f"LoRA+ x{summary['loraplus_ratio']:g}", summary.get("kasa") and "KaSA",
            summary.get("adalora") and f"AdaLoRA, {summary['adalora']['kept']} of {summary['adalora']['initial']} "
                                       "triplets",
            summary.get("bdlora") and f"BD-LoRA, {summary['bdlora']['nblocks']} blocks"]
    tags = [t for t in tags if t]
    qlora = quantized and quantized.startswith("nf4")  # QLoRA is LoRA on a 4-bit NF4 base; on int8 it stays LoRA
    lora = ("QLoRA" if qlora else "LoRA") + (f" ({', '.join(tags)})" if tags else "")  # e.g. "LoRA (pissa)"
    if summary.get("eval_only"):
        lora = f"adapter {summary['adapter']}"
    reduced = summary.get("reduce_intruders")
    names = {"base": f"base model ({quantized})" if quantized else "base model", "lora": lora,
             "full": "full fine-tuning",
             "reduced": reduced and f"{lora}, intruders reduced (lambda {reduced['mitigation_lambda']:g})"}
    lines = [
        "",
        f"SQuAD v{summary.get('squad_version', '1.1')} EM/F1 on {summary['eval_questions']} validation questions "
        f"({summary['model']}, " + ("evaluation only" if summary.get("eval_only") else f"{summary['steps']} steps")
        + "".join(f", {run} stopped early at step {s}" for run, s in (summary.get("early_stop") or {}).items())
        + (f", beam search: {summary['num_beams']} beams, length penalty {summary['length_penalty']:g}"
           if summary.get("num_beams", 1) > 1 else "")
        + (", extractive: spans from the QA head" if summary.get("task") == "extractive" else "") + ")",
        "",
        "| model | EM | F1 |",
        "|---|---|---|",
    ]
    lines += [f"| {names[k]} | {v['exact_match']:.1f} | {v['f1']:.1f} |" for k, v in scores.items()]
    halves = [(k, p, v[p]) for k, v in scores.items() for p in ("has_answer", "no_answer") if p in v]  # SQuAD v2.0
    if halves:
        lines += ["", "| model | questions | EM | F1 |", "|---|---|---|---|"]
        lines += [f"| {names[k]} | {p.replace('_', ' ')} ({s['total']}) | {s['exact_match']:.1f} | {s['f1']:.1f} |"
                  for k, p, s in halves]
    best = [(k, v) for k, v in scores.items() if "best_f1" in v]  # --extractive on v2.0: the null-odds sweep
    if best:
        lines += ["", "| model | best EM | at --null-score-diff-threshold | best F1 | at --null-score-diff-threshold |",
                  "|---|---|---|---|---|"]
        lines += [f"| {names[k]} | {v['best_exact']:.1f} | {v['best_exact_thresh']:.4g} | {v['best_f1']:.1f} | "
                  f"{v['best_f1_thresh']:.4g} |" for k, v in best]
    if summary.get("trainable_params") is not None:
        lines += ["", f"{'adapter' if summary.get('eval_only') else 'trainable'} params: "
                      f"{summary['trainable_params']:,} of {summary['total_params']:,} "
                      f"({summary['trainable_percent']:.3f}%)"]
    if "adapter_bytes" in summary:
        peft = (f"{_mib(summary['peft_bytes'])} (PEFT safetensors)" if summary.get("peft_dir")
                else f"no PEFT copy: {summary['peft_skipped']}")
        lines.append(f"adapter on disk: {_mib(summary['adapter_bytes'])} (orbax), {peft} -> {summary['adapter_dir']}")
    if "base" in scores and "lora" in scores:
        b, l = scores["base"], scores["lora"]
        lines.append(f"EM {b['exact_match']:.1f} -> {l['exact_match']:.1f}, F1 {b['f1']:.1f} -> {l['f1']:.1f}")
    if reduced:
        losses = ", ".join(f"{names[k]} {v:.3f}" for k, v in reduced["context_loss"].items())
        lines.append(f"intruder dimensions: {reduced['intruders']} in {reduced['matrices_with_intruders']} of "
                     f"{reduced['matrices']} adapted matrices; LM loss on the validation contexts: {losses}")
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in summary.get("seconds", {}).items())
    lines.append(f"wall time: {summary['wall_time_s']:.0f} s" + (f" ({parts})" if parts else ""))
    by_id = {r.id: r for r in records}
    ids = [i for i in next(iter(samples.values()), {}) if i in by_id][:n_samples]
    if ids:
        lines += ["", "sample predictions:"]
        for i in ids:
            r = by_id[i]
            lines.append(f"  Q: {r.question}")
            lines.append(f"     gold: {r.answers[0] if r.answers else '(no answer)'!r}" + "".join(
                f" | {k}: {samples[k].get(i, '')!r}" for k in samples))
    return "\n".join(lines)
