"""LoRA fine-tuning of a causal LM on SQuAD v1.1 (or v2.0), with EM/F1 before and after.

Run (offline, on what the project ships: a small GPT-2 pretrained on a generated world, and a
generated SQuAD-format QA set whose validation entities never occur in training):

    python -m train.squad                       # ~5 min on 2 CPU cores; prints the EM/F1 table
    python -m train.squad --full-finetune       # adds a full fine-tuning baseline row
    python -m train.squad --quantize nf4        # QLoRA: the frozen linear weights in 4-bit NF4
    python -m train.squad --quantize int8       # LoRA on 8-bit frozen linear weights (load_in_8bit's layout)
    python -m train.squad --extractive          # span extraction with a QA head (run_qa.py's task)

Online, the seeds' run (BLOOM-560m, r=16, alpha=32, dropout 0.05, fused QKV, 100 steps,
batch 4 x accumulation 4, lr 1e-3, warmup 100):

    python -m train.squad --model bigscience/bloom-560m --data squad --dtype bfloat16
    python -m train.squad --model gpt2 --data squad_v2  # SQuAD v2.0, unanswerable questions included

Outputs in --output-dir: metrics.jsonl, loss.png, summary.json, predictions_<model>.json (and with
--extractive on SQuAD v2.0 null_odds_<model>.json), the orbax adapter (adapter/), its PEFT export
(peft/), and training checkpoints (checkpoints/, for --resume).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from typing import Any

from train import data

LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")  # train.loop.SCHEDULES (not imported: jax)

# Defaults per setting: the seeds' run for real checkpoints, a CPU-sized run for the embedded one.
PRESETS: dict[str, dict[str, Any]] = {
    "hub": dict(steps=100, batch_size=4, grad_accum=4, lr=1e-3, warmup=100, rank=16, alpha=32.0, dropout=0.05,
                targets=None, max_len=512, eval_samples=500, max_new_tokens=32, full_lr=5e-5, doc_stride=128),
    "embedded": dict(steps=300, batch_size=16, grad_accum=1, lr=3e-3, warmup=30, rank=16, alpha=32.0, dropout=0.05,
                     targets="c_attn,c_fc,mlp/c_proj", max_len=192, eval_samples=200, max_new_tokens=12,
                     full_lr=1e-3, doc_stride=64),
}


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.squad", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", default=None, help="HF model id or local checkpoint dir (default: the embedded world model)")
    a("--revision", default=None,
      help="hub revision (branch, tag or commit hash) of --model, and of its tokenizer unless --tokenizer names "
           "another; recorded in the PEFT export")
    a("--tokenizer", default=None, help="tokenizer id or dir, if not the model's own")
    a("--data", default=None, help="'squad' or 'squad_v2' (HF datasets), a SQuAD v1.1 / v2.0 JSON/JSONL file or a dir "
                                   "with train/validation files (default: the embedded world QA set; train/assets/world_v2 is it as SQuAD "
                                   "v2.0, with unanswerable questions)")
    a("--output-dir", default="runs/squad", help="where metrics, adapters and checkpoints go")
    a("--steps", type=int, default=None, help="optimizer steps (default: 100 hub / 300 embedded)")
    a("--batch-size", type=int, default=None, help="rows per micro-batch, split over devices (default 4 / 16)")
    a("--grad-accum", type=int, default=None, help="micro-batches per step, accumulated with lax.scan (default 4 / 1)")
    a("--lr", type=float, default=None, help="peak AdamW learning rate for LoRA (default 1e-3 / 3e-3)")
    a("--warmup", type=int, default=None, help="linear warmup steps, then --lr-scheduler (default 100 / 30)")
    a("--lr-scheduler", choices=LR_SCHEDULERS, default="linear",
      help="after the warmup: linear decay to 0, a half cosine to 0, or the peak held (transformers' "
           "lr_scheduler_type); constant has no warmup")
    a("--weight-decay", type=float, default=0.0,
      help="AdamW weight decay (not on biases and norm weights, as the Trainer)")
    a("--clip", type=float, default=1.0, help="global gradient-norm clipping (0: none, as transformers' max_grad_norm)")
    a("--rank", type=int, default=None, help="LoRA rank r (default 16)")
    a("--alpha", type=float, default=None, help="LoRA alpha; scale = alpha / r (default 32)")
    a("--dropout", type=float, default=None, help="dropout on the LoRA input (default 0.05)")
    a("--targets", default=None, help="comma-separated module names, one regex, or all-linear (default: the "
                                      "fused QKV, c_attn / query_key_value; embedded: c_attn,c_fc,mlp/c_proj)")
    a("--layers-to-transform", default=None, metavar="I,J,...",
      help="adapt the targets in these layers only, e.g. 2,3 (PEFT layers_to_transform; default: every layer)")
    a("--rslora", action="store_true", help="scale alpha / sqrt(r) (rsLoRA)")
    a("--dora", action="store_true", help="DoRA: also train a magnitude per output feature (PEFT use_dora)")
    a("--lora-bias", action="store_true", help="lora_B gets a bias too, added to each targeted layer's bias "
                                               "(PEFT lora_bias)")
    a("--init", default="kaiming_uniform",
      help="adapter init (PEFT init_lora_weights): kaiming_uniform, gaussian, orthogonal; mica (MiCA: B = W0's "
           "minor singular directions, kept fixed, A = 0 trains); eva: A from the "
           "principal directions of each layer's inputs on the first --init-batches training batches (answer "
           "positions), ranks redistributed across layers; or pissa / pissa_niter_<n> / olora / corda (CorDA: W0 "
           "decomposed along its inputs' covariance on --init-batches batches) / lora_ga (LoRA-GA: the directions "
           "of the loss gradient on --init-batches batches), "
           "which start the adapter from part of the weights and train on the residual; the saved "
           "adapters are converted to plain LoRA of rank 2r on the original weights; or, with --quantize nf4, "
           "loftq: the 4-bit base and the adapters chosen together (the base is saved to loftq_base/)")
    a("--loftq-iter", type=int, default=None, help="with --init loftq: alternations of quantization and SVD "
                                                   "(PEFT loftq_iter; default 1)")
    a("--init-batches", type=int, default=None,
      help="with --init eva / corda / lora_ga: the training batches they read (default 8)")
    a("--eva-rho", type=float, default=None, help="with --init eva: a layer takes at most rho * r ranks "
                                                  "(PEFT EvaConfig.rho; default 2, 1 = no redistribution)")
    a("--corda-method", choices=("ipm", "kpm"), default=None,
      help="with --init corda: ipm puts W0's components the data uses most into the adapter (default), kpm "
           "the least, keeping the most used frozen (PEFT CordaConfig.corda_method)")
    a("--loraplus-ratio", type=float, default=None,
      help="LoRA+: lora_B's learning rate is this many times --lr (e.g. 16)")
    a("--alora", action="store_true",
      help="Activated LoRA (PEFT alora_invocation_tokens): the adapter acts from each prompt's ANSWER marker on, "
           "so context and question run (and are cached) as in the base model")
    a("--lorafa", action="store_true",
      help="LoRA-FA (PEFT create_lorafa_optimizer): lora_A stays at its init, lora_B's gradient is projected "
           "through it; less memory and compute per step")
    a("--velora-groups", type=int, default=None, metavar="G",
      help="VeLoRA (PEFT velora_config): the backward pass keeps each adapted layer's input as G numbers per "
           "token (PEFT's default 64), from which lora_A's gradient is approximated")
    a("--velora-init", choices=("batch_average", "random", "batch_average_once"), default="batch_average",
      help="VeLoRA's projection (PEFT velora_config init_type): each batch's mean direction, a random one fixed "
           "at init, or the first training batch's, fixed")
    a("--kasa", action="store_true",
      help="KaSA (PEFT kasa_config): drop each adapted weight's r smallest singular components and train "
           "s * A diag(d) B, with KaSA's regulariser (beta 1e-4, gamma 1e-3) added to the loss")
    a("--adalora", type=int, default=None, metavar="TARGET_R",
      help="AdaLoRA (PEFT AdaLoraConfig): start at --rank triplets per adapted matrix and prune the least important "
           "(smoothed |w * g|) down to TARGET_R per matrix on average: none pruned in the first tenth of --steps, "
           "the final allocation held over the last fifth; AdaLoRA's orthogonal regulariser (weight 0.5) added to "
           "the loss")
    a("--bdlora-blocks", type=int, default=None, metavar="N",
      help="BD-LoRA (PEFT use_bdlora): block-diagonal factors of N blocks, for a server sharding each layer N ways "
           "(lora_A in the row-sharded attention-out and MLP-down layers, lora_B in the column-sharded QKV and "
           "MLP-up ones)")
    a("--reduce-intruders", type=float, nargs="?", const=0.75, default=None, metavar="LAMBDA",
      help="after training, also damp the adapter's intruder dimensions, keeping LAMBDA of each (PEFT "
           "reduce_intruder_dimension; default 0.75): score that adapter too, save it to adapter_reduced/ and "
           "peft_reduced/, and report each model's LM loss on the validation contexts (what the base model knew)")
    a("--init-adapter", default=None,
      help="start from an existing adapter (a lora_jax adapter dir, a PEFT adapter dir or its hub id); its config "
           "replaces --rank/--alpha/--targets/--layers-to-transform")
    a("--export-dtype", choices=("float32", "float16", "bfloat16"), default="float32",
      help="dtype of the exported PEFT adapter tensors")
    a("--max-len", type=int, default=None, help="max tokens per example; contexts are cut around the answer")
    a("--prompt-template", default=data.PROMPT_TEMPLATE,
      help="the prompt, with {context} and {question} once each (Python format syntax, e.g. "
           "'Context: {context}\\nQuestion: {question}\\nAnswer:'); the model continues it with the answer + EOS; "
           "its text after the last field is --alora's invocation")
    a("--full-sequence-loss", action="store_true", help="loss on every token, not only the answer + EOS")
    a("--packing", action="store_true",
      help="training rows of --max-len tokens holding several examples (TRL's packing), each attending to itself "
           "alone with its own positions, so the loss is the unpacked one with fewer pad slots computed; "
           "--batch-size then counts rows")
    a("--extractive", action="store_true",
      help="extractive QA, as transformers' run_qa.py trains *ForQuestionAnswering: start / end logits on every "
           "token pick the answer span in the context, from the question + context (no prompt template, nothing "
           "generated); the head (qa_outputs: the checkpoint's, or a new one) trains in full beside LoRA, exported "
           "as PEFT's QUESTION_ANS task")
    a("--doc-stride", type=int, default=None,
      help="with --extractive: a context longer than --max-len minus its question is cut into windows sharing "
           "this many tokens (run_qa.py's doc_stride; default 128 / 64)")
    a("--max-answer-length", type=int, default=None,
      help="with --extractive: the longest answer span, in tokens (run_qa.py's; default 30)")
    a("--null-score-diff-threshold", type=float, default=None,
      help="with --extractive on SQuAD v2.0: answer nothing where the null score (token 0's start + end logit) "
           "beats the best span's by more than this (run_qa.py's; default 0)")
    a("--version-2-with-negative", action="store_true",
      help="SQuAD v2.0: questions without an answer are unanswerable (trained to answer nothing, EOS alone) "
           "rather than malformed, and scoring follows evaluate-v2.0.py; automatic for --data squad_v2, a file "
           "whose version is v2.0, or records with is_impossible")
    a("--eval-samples", type=int, default=None, help="validation questions to score (0 = all)")
    a("--train-samples", type=int, default=0,
      help="train on the first N training records only (run_qa.py's --max_train_samples; 0 = all)")
    a("--eval-batch-size", type=int, default=32, help="prompts per generation batch")
    a("--max-new-tokens", type=int, default=None, help="tokens generated per answer at most")
    a("--num-beams", type=int, default=1,
      help="answers by beam search with this many beams (transformers' generate(num_beams=...)); 1 = greedy")
    a("--length-penalty", type=float, default=1.0,
      help="with --num-beams: a finished answer scores its summed log-probability / length**LENGTH_PENALTY")
    a("--no-base-eval", action="store_true", help="skip scoring the base model")
    a("--eval-only", action="store_true",
      help="no training: score the base model and, with --init-adapter, that adapter (a lora_jax or PEFT adapter)")
    a("--full-finetune", action="store_true", help="also train a full fine-tuning baseline and score it")
    a("--full-lr", type=float, default=None, help="peak learning rate of the full fine-tuning baseline")
    a("--parallel", choices=("jit", "pmap", "fsdp"), default="jit",
      help="data parallelism over all devices: jit (state replicated), pmap, or fsdp (frozen weights, "
           "trainable leaves and optimizer state split over the devices too, for models one device cannot hold)")
    a("--dtype", choices=("float32", "bfloat16"), default="float32", help="frozen parameter dtype")
    a("--compute-dtype", choices=("float32", "bfloat16"), default=None,
      help="activation dtype (default: bfloat16 on GPU/TPU, float32 on CPU)")
    a("--scan-layers", action="store_true", help="run layers with lax.scan (faster compile, slower step)")
    a("--remat", action="store_true",
      help="gradient checkpointing: recompute each layer's activations in the backward pass (less memory)")
    a("--remat-policy", default=None,
      help="with --remat: what to keep, a name in jax.checkpoint_policies (e.g. dots_with_no_batch_dims_saveable)")
    a("--quantize", choices=("nf4", "int8"), default=None,
      help="hold the frozen linear weights quantized while LoRA trains: nf4 = QLoRA's 4-bit NormalFloat, int8 = "
           "8 bits with a scale per output feature (transformers' load_in_8bit layout); bitsandbytes' bytes")
    a("--quant-block-size", type=int, default=None, help="weights per NF4 absmax block (bitsandbytes blocksize; 64)")
    a("--double-quant", action="store_true",
      help="with --quantize: store the NF4 absmax in 8 bits too (QLoRA's double quantization)")
    a("--seed", type=int, default=0, help="seed for adapters, data order and dropout")
    a("--checkpoint-every", type=int, default=100, help="save a training checkpoint every N steps")
    a("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    a("--stop-after", type=int, default=None,
      help="stop this invocation after N steps, with a checkpoint (continue later with --resume)")
    a("--skip-nonfinite", action="store_true", help="skip steps with a non-finite loss/gradient instead of stopping")
    a("--log-every", type=int, default=10, help="metrics.jsonl / progress-bar update interval (steps)")
    a("--eval-every", type=int, default=None, metavar="N",
      help="every N steps and at the end, the mean answer-token loss on the scored validation questions "
           "(teacher-forced, no dropout): logged, in metrics.jsonl as val_loss, dashed in loss.png")
    a("--keep-best", action="store_true",
      help="with --eval-every: score, save and export the adapter of the lowest validation loss, not the last "
           "step's (kept under checkpoints/<run>_best, so --resume keeps it too)")
    a("--early-stopping", type=int, default=None, metavar="PATIENCE",
      help="with --eval-every and --keep-best: stop training after PATIENCE evaluations without a lower validation "
           "loss (transformers' EarlyStoppingCallback); the best step is the one scored, saved and exported")
    a("--no-progress", action="store_true", help="no progress bar (logs only)")
    a("--coordinator", default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
      help="multi-process: host:port of process 0 (env JAX_COORDINATOR_ADDRESS)")
    a("--num-processes", type=int, default=_env_int("JAX_NUM_PROCESSES"),
      help="multi-process: number of processes (env JAX_NUM_PROCESSES)")
    a("--process-id", type=int, default=_env_int("JAX_PROCESS_ID"),
      help="multi-process: this process's index (env JAX_PROCESS_ID)")
    a("--distributed", action="store_true",
      help="call jax.distributed.initialize() with cluster auto-detection (TPU pods, SLURM, ...)")
    args = p.parse_args(argv)
    preset = PRESETS["embedded" if args.model is None else "hub"]
    given = {k for k in preset if getattr(args, k) is not None}  # typed, not a preset's
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for name in ("steps", "batch_size", "grad_accum", "rank", "max_len", "eval_batch_size", "max_new_tokens",
                 "num_beams", "checkpoint_every", "log_every"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for flag, value, ok, what in (("--lr", args.lr, lambda v: v > 0, "a positive number"),
                                  ("--full-lr", args.full_lr, lambda v: v > 0, "a positive number"),
                                  ("--weight-decay", args.weight_decay, lambda v: v >= 0, "a number >= 0"),
                                  ("--clip", args.clip, lambda v: v >= 0, "a number >= 0 (0: no clipping)")):
        if not (math.isfinite(value) and ok(value)):
            p.error(f"{flag} must be {what}, got {value}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.seed < 0:  # numpy's generators (data order) take none below 0
        p.error(f"--seed must be >= 0, got {args.seed}")
    # alpha 0 zeroes the scale, so nothing would train (AdaLoRA alone reads 0 as "scale 1")
    if not math.isfinite(args.alpha) or (args.alpha == 0 and args.adalora is None):
        p.error(f"--alpha must be a finite nonzero number (scale = alpha / r), got {args.alpha}")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        p.error(f"--output-dir {args.output_dir} exists and is not a directory")
    if args.stop_after is not None and args.stop_after <= 0:
        p.error(f"--stop-after must be positive, got {args.stop_after}")
    if args.eval_every is not None and args.eval_every <= 0:
        p.error(f"--eval-every must be positive, got {args.eval_every}")
    if not math.isfinite(args.length_penalty):
        p.error(f"--length-penalty must be a finite number, got {args.length_penalty}")
    if args.length_penalty != 1.0 and args.num_beams == 1:
        p.error(f"--length-penalty {args.length_penalty} ranks beam-search answers: pass --num-beams N (> 1) with it")
    if args.keep_best and args.eval_every is None:
        p.error("--keep-best keeps the step of the lowest validation loss: pass --eval-every N with it")
    if args.early_stopping is not None and (args.early_stopping <= 0 or not args.keep_best):
        p.error(f"--early-stopping {args.early_stopping}: a positive patience (in evaluations), with --eval-every N "
                "--keep-best (the step it keeps is the best one)")
    if args.coordinator and (args.num_processes is None or args.process_id is None):
        p.error("--coordinator needs --num-processes and --process-id (or JAX_NUM_PROCESSES / JAX_PROCESS_ID)")
    if args.eval_samples < 0:
        p.error(f"--eval-samples must be >= 0, got {args.eval_samples}")
    if args.train_samples < 0:
        p.error(f"--train-samples must be >= 0, got {args.train_samples}")
    if args.layers_to_transform is not None:
        layers = args.layers_to_transform.split(",")
        if not all(re.fullmatch(r"\d+", i.strip()) for i in layers):
            p.error(f"--layers-to-transform {args.layers_to_transform!r}: comma-separated layer indices (ints >= 0)")
        args.layers_to_transform = [int(i) for i in layers]
    if not 0 <= args.dropout < 1:
        p.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if not re.fullmatch(r"kaiming_uniform|gaussian|orthogonal|mica|eva|corda|lora_ga|pissa|pissa_niter_\d+|olora|loftq",
                        args.init):
        p.error(f"--init: unknown init {args.init!r}; expected kaiming_uniform, gaussian, orthogonal, mica, eva, "
                "corda, lora_ga, pissa, pissa_niter_<n>, olora or loftq")
    for flag, v, inits, want, ok in (
            ("--init-batches", args.init_batches, ("eva", "corda", "lora_ga"), "a positive count", lambda n: n > 0),
            ("--eva-rho", args.eva_rho, ("eva",), "a number >= 1", lambda r: math.isfinite(r) and r >= 1),
            ("--corda-method", args.corda_method, ("corda",), "ipm or kpm", lambda m: True)):
        if v is not None and (args.init not in inits or not ok(v)):
            p.error(f"{flag} {v}: {want} for --init {' / '.join(inits)}")
    if args.init == "loftq" and not args.quantize:
        p.error("--init loftq chooses the 4-bit base and the adapters together: pass --quantize nf4 with it")
    if args.loftq_iter is not None and (args.init != "loftq" or args.loftq_iter <= 0):
        p.error(f"--loftq-iter {args.loftq_iter}: a positive count for --init loftq")
    if args.alora and args.init_adapter:
        p.error("--alora makes a fresh aLoRA config; --init-adapter brings its own: use one or the other")
    args.prompt_template = args.prompt_template.replace("\\n", "\n").replace("\\t", "\t")  # as typed in a shell
    try:
        template = data.PromptTemplate(args.prompt_template)
    except ValueError as e:
        p.error(f"--prompt-template: {e}")
    if args.alora and not template.marker.strip():
        p.error(f"--alora: the prompt template {args.prompt_template!r} ends with a field; aLoRA's invocation is the "
                "text after the last one, e.g. '\\nAnswer:'")
    if args.init != "kaiming_uniform" and args.init_adapter:
        p.error("--init makes fresh adapters; --init-adapter starts from saved ones: use one or the other")
    if args.loraplus_ratio is not None and not (math.isfinite(args.loraplus_ratio) and args.loraplus_ratio > 0):
        p.error(f"--loraplus-ratio must be a positive number, got {args.loraplus_ratio}")
    if args.lorafa and args.loraplus_ratio is not None:
        p.error("--lorafa freezes lora_A, whose rate --loraplus-ratio sets: use one or the other")
    if args.init == "mica" and (args.lorafa or args.loraplus_ratio is not None):
        p.error(f"--init mica trains lora_A alone; {'--lorafa' if args.lorafa else '--loraplus-ratio'} sets how "
                "lora_B trains: use one or the other")
    if args.velora_init != "batch_average" and args.velora_groups is None:
        p.error(f"--velora-init {args.velora_init} chooses VeLoRA's projection: pass --velora-groups with it")
    if args.velora_groups is not None:
        if args.velora_groups <= 0:
            p.error(f"--velora-groups must be positive, got {args.velora_groups}")
        clash = [f for f, on in (("--dora", args.dora), ("--alora", args.alora), ("--init-adapter", args.init_adapter),
                                 ("--lorafa", args.lorafa)) if on]
        if clash:
            p.error(f"--velora-groups changes lora_A's gradient; not with {', '.join(clash)}")
    if args.kasa:
        clash = [f for f, on in (("--dora", args.dora), ("--alora", args.alora), ("--init-adapter", args.init_adapter),
                                 ("--lorafa", args.lorafa), ("--velora-groups", args.velora_groups is not None),
                                 ("--reduce-intruders", args.reduce_intruders is not None),
                                 (f"--init {args.init}", args.init not in ("kaiming_uniform", "gaussian"))) if on]
        if clash:
            p.error(f"--kasa is its own LoRA variant on a truncated base; not with {', '.join(clash)}")
    if args.adalora is not None:
        if not 0 < args.adalora <= args.rank:
            p.error(f"--adalora {args.adalora}: the target rank is between 1 and --rank {args.rank}")
        clash = [f for f, on in (("--dora", args.dora), ("--alora", args.alora), ("--init-adapter", args.init_adapter),
                                 ("--lorafa", args.lorafa), ("--velora-groups", args.velora_groups is not None),
                                 ("--kasa", args.kasa), ("--rslora", args.rslora), ("--lora-bias", args.lora_bias),
                                 ("--loraplus-ratio", args.loraplus_ratio is not None),
                                 ("--reduce-intruders", args.reduce_intruders is not None),
                                 (f"--init {args.init}", args.init != "kaiming_uniform")) if on]
        if clash:
            p.error(f"--adalora has its own init, scale and ranks; not with {', '.join(clash)}")
    if args.bdlora_blocks is not None:
        if args.bdlora_blocks <= 0:
            p.error(f"--bdlora-blocks must be positive, got {args.bdlora_blocks}")
        clash = [f for f, on in (("--dora", args.dora), ("--alora", args.alora), ("--init-adapter", args.init_adapter),
                                 ("--lorafa", args.lorafa), ("--velora-groups", args.velora_groups is not None),
                                 ("--kasa", args.kasa), ("--adalora", args.adalora is not None),
                                 ("--lora-bias", args.lora_bias),
                                 ("--reduce-intruders", args.reduce_intruders is not None),
                                 (f"--init {args.init}", args.init not in ("kaiming_uniform", "gaussian"))) if on]
        if clash:
            p.error(f"--bdlora-blocks is its own LoRA variant (block-diagonal factors); not with {', '.join(clash)}")
    if args.reduce_intruders is not None:
        if not 0 <= args.reduce_intruders <= 1:
            p.error(f"--reduce-intruders keeps a share of each intruder dimension: in [0, 1], got {args.reduce_intruders}")
        if args.dora:
            p.error("--reduce-intruders changes the directions DoRA's trained magnitude belongs to: not with --dora")
        if args.eval_only and not args.init_adapter:
            p.error("--reduce-intruders --eval-only acts on an adapter: pass --init-adapter")
    if args.eval_only:
        clash = [f for f, on in (("--full-finetune", args.full_finetune), ("--resume", args.resume),
                                 ("--stop-after", args.stop_after is not None),
                                 ("--eval-every", args.eval_every is not None),
                                 (f"--init {args.init}", args.init != "kaiming_uniform")) if on]
        if clash:
            p.error(f"--eval-only trains nothing, so it takes no {', '.join(clash)}")
        if args.no_base_eval and not args.init_adapter:
            p.error("--eval-only --no-base-eval scores nothing: pass --init-adapter, or score the base")
    if args.extractive:
        clash = [f for f, on in (("--alora", args.alora), ("--packing", args.packing),
                                 ("--full-sequence-loss", args.full_sequence_loss),
                                 ("--num-beams", args.num_beams != 1), ("--max-new-tokens", "max_new_tokens" in given),
                                 ("--prompt-template", args.prompt_template != data.PROMPT_TEMPLATE),
                                 ("--reduce-intruders", args.reduce_intruders is not None)) if on]
        if clash:
            p.error(f"--extractive picks spans with a QA head, generating nothing: it takes no {', '.join(clash)}")
        if args.max_answer_length is None:
            args.max_answer_length = 30
        if args.max_answer_length <= 0:
            p.error(f"--max-answer-length must be positive, got {args.max_answer_length}")
        if args.null_score_diff_threshold is None:
            args.null_score_diff_threshold = 0.0
        if not math.isfinite(args.null_score_diff_threshold):
            p.error(f"--null-score-diff-threshold must be a finite number, got {args.null_score_diff_threshold}")
        if not 0 <= args.doc_stride < args.max_len:
            p.error(f"--doc-stride {args.doc_stride}: windows of at most --max-len {args.max_len} tokens share it, "
                    "so it is in [0, --max-len)")
    else:
        stray = [f for f, v in (("--doc-stride", args.doc_stride if "doc_stride" in given else None),
                                ("--max-answer-length", args.max_answer_length),
                                ("--null-score-diff-threshold", args.null_score_diff_threshold)) if v is not None]
        if stray:
            p.error(f"{stray[0]} belongs to --extractive's span reading: pass --extractive with it")
    if args.remat_policy and not args.remat:
        p.error("--remat-policy says what --remat keeps; pass --remat with it")
    if args.double_quant and args.quantize != "nf4":
        p.error("--double-quant quantizes the scales of --quantize nf4; pass --quantize nf4 with it")
    if args.quant_block_size is not None and args.quantize != "nf4":
        p.error("--quant-block-size sets the NF4 blocks of --quantize nf4; pass --quantize nf4 with it")
    if args.init == "loftq" and args.quantize == "int8":
        p.error("--init loftq fits the adapters to 4-bit NF4 codes: pass --quantize nf4 with it, not int8")
    if args.quantize and args.full_finetune:
        p.error(f"--full-finetune trains the weights that --quantize {args.quantize} freezes; use one or the other")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from .run import run
        run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
