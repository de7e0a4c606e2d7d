"""The SQuAD job behind `python -m train.squad`: load, score the base, train, score, save."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import itertools
import math
import re
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

import lora_jax as lj
from lora_jax import quant
from lora_jax.models import from_pretrained, load_tokenizer, question_answering_from_pretrained
from lora_jax.models.heads import QA_OUTPUTS

from . import data, extractive, report
from .evaluate import evaluate, text_loss
from .loop import VOCAB_MULTIPLE, Runner, StepConfig, make_optimizer, make_schedule, put_fsdp, row_layout, target_loss
from .state import TrainCheckpoints, write_json


ASSETS = Path(__file__).resolve().parent / "assets"
EMBEDDED_MODEL = ASSETS / "world_model"  # the small GPT-2 that train/pretrain_world.py produced
EMBEDDED_DATA = ASSETS / "world"  # the generated SQuAD-format QA set (train/make_assets.py)
RUNS = {"base", "lora", "reduced", "full"}  # the models a run may score (predictions_<run>.json)
QUANTIZED = {"nf4": "4-bit NF4", "int8": "8-bit (LLM.int8 rows)"}  # a prequantized checkpoint's weights, in words


class NonFiniteError(RuntimeError):
    """A step produced a non-finite loss or gradient."""


def _dtype(name: str | None):
    return None if name is None else jnp.dtype(name)


def load_model(args):
    """(model, params, tokenizer), with the tokenizer checked against the model's vocabulary."""
    name = args.model or EMBEDDED_MODEL
    accel = jax.default_backend() != "cpu"
    compute = _dtype(args.compute_dtype) or (jnp.bfloat16 if accel else jnp.float32)
    if args.revision is not None and args.model is None:
        raise ValueError(f"--revision {args.revision} needs --model: the embedded default has no hub revisions")
    kw = dict(revision=args.revision, dtype=_dtype(args.dtype), compute_dtype=compute, scan_layers=args.scan_layers,
              remat=args.remat, remat_policy=args.remat_policy)
    if args.extractive:  # the checkpoint's qa_outputs, or a new one drawn from the seed
        model, params = question_answering_from_pretrained(name, key=jax.random.fold_in(jax.random.key(args.seed), 3),
                                                           **kw)
    else:
        model, params = from_pretrained(name, **kw)
    tok_name = args.tokenizer or name
    tokenizer = load_tokenizer(tok_name, None if args.tokenizer else args.revision)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tok_name} has no EOS token; the answer format needs one")
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"tokenizer {tok_name} has {len(tokenizer)} tokens but the vocabulary of model {name} is "
                         f"{model.config.vocab_size}: the tokenizer does not fit the model")
    return model, params, tokenizer


def load_data(args, tokenizer, log):
    """(training examples, eval prompts, the scored validation records, whether it is SQuAD v2.0)."""
    source = args.data or EMBEDDED_DATA
    splits = {}
    for split in ("train", "validation"):
        res = data.load_split(source, split, v2=args.version_2_with_negative)
        skipped = {k: v for k, v in res.skipped.items() if v}
        log(f"{split}: {len(res.records)} records from {source}" +
            (f" ({res.unanswerable} unanswerable, SQuAD v2.0)" if res.v2 else "") +
            (f"; skipped {res.num_skipped} malformed: {skipped}" if res.num_skipped else "") +
            (f"; repaired {res.repaired} answer starts" if res.repaired else "") +
            (f"; dropped {res.dropped_answers} gold answers found nowhere in their context"
             if res.dropped_answers else ""))
        splits[split] = res
    train_records = splits["train"].records
    if args.train_samples and args.train_samples < len(train_records):
        log(f"train: the first {args.train_samples} of the {len(train_records)} records (--train-samples)")
        train_records = train_records[: args.train_samples]
    val_records = splits["validation"].records
    if args.eval_samples:
        val_records = val_records[: args.eval_samples]
    v2 = splits["train"].v2 or splits["validation"].v2
    if args.extractive:
        return (*span_features(args, tokenizer, train_records, val_records, log), val_records, v2)
    enc_train = data.encode(tokenizer, train_records, args.max_len, train=True,
                            full_sequence_loss=args.full_sequence_loss, template=args.prompt_template)
    enc_val = data.encode(tokenizer, val_records, args.max_len - args.max_new_tokens, train=False,
                          template=args.prompt_template)
    if enc_train.skipped.get("too_long"):
        log(f"train: skipped {enc_train.skipped['too_long']} examples whose question and answer (the context cut "
            "around it) exceed --max-len")
    if not enc_train.examples:
        raise ValueError(f"no training example fits --max-len {args.max_len}")
    _check_prompted(val_records, enc_val.examples, log, f"--max-len {args.max_len} minus --max-new-tokens "
                    f"{args.max_new_tokens}")
    return enc_train.examples, enc_val.examples, val_records, v2


def _check_prompted(records, examples, log, room: str) -> None:
    """Validation questions without a prompt score 0 (as the official script scores a question
    without a prediction): say how many; refuse when none has one."""
    missing = len(records) - len({e.id for e in examples})
    if records and missing == len(records):
        raise ValueError(f"no validation question fits {room}: nothing to score")
    if missing:
        log(f"validation: {missing} of {len(records)} questions do not fit {room}; they score 0")


def check_positions(args, model, splits: dict[str, Sequence], prompts: Sequence = ()) -> None:
    """Every training (and validation-loss) example must fit the model's learned positions (GPT-2's;
    BLOOM's ALiBi has no limit): past them its logits would be NaN. Packed rows may be longer, as
    positions restart at each example. So must every validation prompt with the answer generated
    after it (its last token never fed back): generate would refuse it, but only after training."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is None:
        return
    model_name = args.model or EMBEDDED_MODEL
    for name, examples in splits.items():
        longest = max((e.length for e in examples), default=0)
        if longest > limit:
            raise ValueError(f"a {name} example of {longest} tokens exceeds the {limit} positions of model "
                             f"{model_name} (max_position_embeddings): pass --max-len {limit} or less")
    longest = max((e.length for e in prompts), default=0)
    if prompts and longest + args.max_new_tokens - 1 > limit:
        raise ValueError(f"a validation prompt of {longest} tokens + --max-new-tokens {args.max_new_tokens} exceeds "
                         f"the {limit} positions of model {model_name} (max_position_embeddings): "
                         f"pass --max-len {limit + 1} or less")


def span_features(args, tokenizer, train_records, val_records, log) -> tuple[tuple, tuple]:
    """--extractive's (training features, validation features): question + context windows."""
    out = []
    for name, records in (("train", train_records), ("validation", val_records)):
        got = extractive.featurize(tokenizer, records, args.max_len, args.doc_stride)
        log(f"{name}: {len(got.features)} features of {len(records) - got.skipped} records"
            + (f" ({got.split_records} cut into windows sharing --doc-stride {args.doc_stride} tokens)"
               if got.split_records else "")
            + (f"; skipped {got.skipped} whose question leaves too little of --max-len" if got.skipped else ""))
        out.append(got.features)
    if not out[0]:
        raise ValueError(f"no training record fits --max-len {args.max_len}")
    _check_prompted(val_records, out[1], log, f"--max-len {args.max_len}")
    return out[0], out[1]


def loss_examples(args, tokenizer, records, log, val_ex=()) -> tuple:
    """--eval-every's validation set: the scored questions as training examples (prompt, first
    gold answer, EOS), whose answer-token loss is the training loss's counterpart; with
    --extractive, the scored features `val_ex` (labelled with their gold spans)."""
    if not args.eval_every:
        return ()
    if args.extractive:
        return val_ex
    enc = data.encode(tokenizer, records, args.max_len, train=True, full_sequence_loss=args.full_sequence_loss,
                      template=args.prompt_template)
    if enc.skipped.get("too_long"):
        log(f"validation loss: skipped {enc.skipped['too_long']} examples whose answer window exceeds --max-len")
    if not enc.examples:
        raise ValueError(f"--eval-every: no validation example fits --max-len {args.max_len}")
    return enc.examples


FUSED_QKV = {"gpt2": "c_attn", "bloom": "query_key_value"}
# --bdlora-blocks: (block-diagonal lora_A: the row-sharded layers, lora_B: the column-sharded ones)
BD_SIDES = {"gpt2": (("c_proj",), ("c_attn", "c_fc")),
            "bloom": (("self_attention.dense", "dense_4h_to_h"), ("query_key_value", "dense_h_to_4h"))}


def adalora_schedule(args) -> lj.AdaLoraSchedule | None:
    """--adalora's schedule over the run: pruning from a tenth of the steps on, the final allocation
    over the last fifth."""
    if args.adalora is None:
        return None
    return lj.AdaLoraSchedule(target_r=args.adalora, total_step=args.steps, tinit=args.steps // 10,
                              tfinal=args.steps // 5)


def bdlora_layout(args, model) -> lj.BdLoraConfig | None:
    """--bdlora-blocks's layout: which of the model's layers get a block-diagonal A or B."""
    if args.bdlora_blocks is None:
        return None
    kind = model.config.model_type
    if kind not in BD_SIDES:
        raise ValueError(f"--bdlora-blocks: no layout for model type {kind!r}; known: {sorted(BD_SIDES)}")
    a, b = BD_SIDES[kind]
    return lj.BdLoraConfig(target_modules_bd_a=a, target_modules_bd_b=b, nblocks=args.bdlora_blocks)


def adalora_ranks(lora: lj.LoraConfig, adapters) -> dict[str, Any] | None:
    """AdaLoRA's allocation for the report: {"target_r", "kept" (triplets left of "initial"),
    "ranks": {adapted path: rank, or one per layer of a stack}}; None for other adapters."""
    if lora.adalora is None or adapters is None:
        return None
    kept = lj.adalora.kept(adapters)
    return {"target_r": lora.adalora.target_r, "initial": sum(k.size for k in kept.values()),
            "kept": int(sum(k.sum() for k in kept.values())),
            "ranks": {p: k.sum(-1).tolist() for p, k in kept.items()}}


def lora_config(args, model, tokenizer) -> lj.LoraConfig:
    """The LoRA config from flags; by default the fused QKV of the model's architecture."""
    targets = args.targets or FUSED_QKV.get(model.config.model_type, "c_attn")
    targets = targets if any(c in targets for c in "*\\[]()|+?^$") else tuple(t for t in targets.split(",") if t)
    return lj.LoraConfig(rank=args.rank, alpha=args.alpha, targets=targets, dropout=args.dropout,
                         use_rslora=args.rslora, use_dora=args.dora, lora_bias=args.lora_bias,
                         layers_to_transform=args.layers_to_transform, velora_num_groups=args.velora_groups,
                         velora_init_type=args.velora_init,
                         use_kasa=args.kasa, adalora=adalora_schedule(args), use_bdlora=bdlora_layout(args, model),
                         alora_invocation_tokens=(tokenizer(data.PromptTemplate(args.prompt_template).marker,
                                                            add_special_tokens=False)["input_ids"]
                                                  if args.alora else None),
                         init="kaiming_uniform" if args.init == "loftq" else args.init,  # LoftQ's: plain LoRA
                         trainable=QA_OUTPUTS if args.extractive else None)


def check_invocation(lora: lj.LoraConfig, splits: dict[str, list]) -> None:
    """An aLoRA adapter acts from its invocation tokens on: every prompt must hold them."""
    tokens = lora.alora_invocation_tokens
    if tokens is None:
        return
    for name, examples in splits.items():
        if not examples:
            continue
        # One alora_mask call over the prompts right-padded with -1 (no token): its last column
        # says whether each holds the invocation.
        ids = np.full((len(examples), max(len(ex.tokens) for ex in examples)), -1, np.int64)
        for i, ex in enumerate(examples):
            ids[i, : len(ex.tokens)] = ex.tokens
        found = np.asarray(lj.alora_mask(lora, ids))[:, -1]
        missing = [ex.id for ex, ok in zip(examples, found) if not ok]
        if missing:
            raise ValueError(f"aLoRA invocation tokens {list(tokens)} are missing from {len(missing)} of the "
                             f"{len(examples)} {name} prompts (e.g. {missing[0]!r}): the adapter would not act there")


def check_head(args, lora: lj.LoraConfig, params) -> None:
    """--extractive trains the QA head beside LoRA: an --init-adapter must train it too (PEFT's
    QUESTION_ANS task)."""
    trains = {p.split("/")[0] for p, t in lj.tree.flatten(lj.trainable_mask(lora, params)).items() if t}
    if args.extractive and QA_OUTPUTS not in trains:
        raise ValueError(f"--extractive trains the {QA_OUTPUTS} head beside LoRA, but --init-adapter "
                         f"{args.init_adapter} leaves it out (not PEFT's QUESTION_ANS task, with {QA_OUTPUTS} "
                         "in modules_to_save)")


def load_init_adapter(path: str, params, model):
    """(config, adapters, params with trained extras) from a lora_jax or PEFT adapter directory."""
    from lora_jax import checkpoint, peft

    try:
        with warnings.catch_warnings():  # run() puts a KaSA adapter on its truncated base (kasa_base)
            warnings.filterwarnings("ignore", ".*" + re.escape(lj.kasa.BASE_WARNING))  # after the adapter's path
            got = peft.load_adapter(path, params, model_config=model.config)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--init-adapter {e}") from None
    return got.config, got.adapters, checkpoint.update_params(params, got.extras) if got.extras else params


def save_adapter(out: Path, lora: lj.LoraConfig, params, adapters, model, base_model: str, dtype: str,
                 initial=None, suffix: str = "", revision: str | None = None) -> dict:
    """The trained adapter twice: orbax (lora_jax) and PEFT format, in adapter<suffix>/ and
    peft<suffix>/. Returns paths and sizes.

    Adapters trained on PiSSA / OLoRA residual weights are saved as plain LoRA on the original
    weights (`to_plain`, rank 2r), given `initial`, the adapters they started from. A KaSA or BD-LoRA
    adapter on GPT-2's Conv1D layers gets no PEFT copy (PEFT refuses those variants there): the
    result then says why under "peft_skipped"."""
    from lora_jax import checkpoint, peft

    if lora.changes_base:
        lora, adapters = lj.to_plain(lora, adapters, initial)
    a_dir = checkpoint.save(out / f"adapter{suffix}", lora, adapters, base_model=base_model, params=params,
                            overwrite=True)
    size = lambda d: sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file())
    saved = {"adapter_dir": str(a_dir), "adapter_bytes": size(a_dir)}
    refusal = peft.peft_refusal(lora, model.config)
    if refusal:
        return saved | {"peft_dir": None, "peft_skipped": refusal}
    p_dir = peft.save_peft(out / f"peft{suffix}", lora, adapters, model_config=model.config, params=params,
                           dtype=dtype, base_model_name_or_path=base_model, revision=revision, overwrite=True)
    return saved | {"peft_dir": str(p_dir), "peft_bytes": (Path(p_dir) / peft.WEIGHTS_FILE).stat().st_size}


def reduce_intruders(args, lora: lj.LoraConfig, params, adapters, log) -> tuple[dict, dict]:
    """(adapters with their intruder dimensions damped by --reduce-intruders, counts for the summary)."""
    reduced, found = lj.reduce_intruders(lora, params, adapters, mitigation_lambda=args.reduce_intruders)
    counts = np.concatenate([np.ravel(n) for n in found.values()])  # one per matrix (per layer of a stack)
    summary = {"intruders": int(counts.sum()), "matrices_with_intruders": int(np.count_nonzero(counts)),
               "matrices": int(counts.size)}
    log(f"intruder dimensions: {summary['intruders']} in {summary['matrices_with_intruders']} of "
        f"{summary['matrices']} adapted matrices; keeping {args.reduce_intruders:g} of each")
    return reduced, summary


def training_rows(args, examples, log) -> tuple[data.Encoded, ...] | tuple[data.Packed, ...]:
    """What a training batch's rows hold: one example each, or with --packing several (`data.pack`)."""
    if not args.packing:
        return tuple(examples)
    rows = data.pack(examples, args.max_len)
    fill = sum(r.length for r in rows) / (len(rows) * args.max_len)
    log(f"--packing: {len(examples)} training examples in {len(rows)} rows of {args.max_len} tokens "
        f"({100 * fill:.1f}% of the slots real)")
    return rows


def calibration(args, tokenizer, examples) -> list[dict[str, np.ndarray]]:
    """The first --init-batches training batches (in the run's own order), for EVA, CorDA, LoRA-GA."""
    stream = data.train_batches(examples, batch_size=args.batch_size * args.grad_accum,
                                buckets=data.bucket_lengths(args.max_len), pad_id=data.pad_id_of(tokenizer),
                                seed=args.seed, make_batch=batch_maker(args))
    return [batch for _, batch in itertools.islice(stream, args.init_batches or 8)]


def batch_maker(args) -> Callable[..., dict[str, np.ndarray]]:
    """What builds a training batch: of span features (--extractive) or of examples / packed rows."""
    return extractive.make_batch if args.extractive else data.make_train_batch


def objective(args, model, lora: lj.LoraConfig | None, rows) -> Callable[..., tuple]:
    """`loss(params, adapters, batch, rng) -> (sum, count)` the job trains on `rows` with (lora=None:
    every parameter): the answer tokens' loss, or with --extractive the span loss per feature."""
    if args.extractive:
        return extractive.span_loss(extractive.span_logits(model, lora))
    if lora is not None:
        logits = lora_logits(model, lora)
    else:
        def logits(p, a, ids, mask, rng, pos, **rows):
            return model.apply(p, ids, mask, positions=pos, vocab_multiple=VOCAB_MULTIPLE, **rows)
    return target_loss(logits, _targets_per_row(rows, args.full_sequence_loss, args.max_len))


def forward(model):
    """f(params, batch) for the data-driven inits: the model on a training batch (packed or not)."""
    return lambda p, b: model.apply(p, b["input_ids"], **row_layout(b))



def eva_init(args, model, params, tokenizer, examples, lora: lj.LoraConfig, log):
    """EVA's (config, adapters) from the inputs the targeted layers see on the first training
    batches, at the positions that carry the loss (PEFT's label mask), on the full-precision base."""
    batches = calibration(args, tokenizer, examples)
    new, adapters = lj.init_eva(lora, params, forward(model), batches,
                                mask=lambda b: b["attention_mask"] * b.get("loss_mask", 1),  # --extractive: all
                                eva=lj.EvaConfig(rho=args.eva_rho or 2.0),
                                key=jax.random.fold_in(jax.random.key(args.seed), 1))
    ranks = sorted(ab["lora_A"].shape[-1] for ab in adapters.values())
    dropped = len(lj.target_paths(lora, params)) - len(adapters)
    log(f"init eva: {len(batches)} batches; ranks {ranks[0]}..{ranks[-1]} (budget {lora.rank} each)"
        + (f", {dropped} layer{'s' if dropped > 1 else ''} left without LoRA" if dropped else ""))
    return new, adapters


def residual_data_init(args, model, params, tokenizer, examples, lora: lj.LoraConfig, log):
    """CorDA's or LoRA-GA's (residual params, adapters) from the first training batches: CorDA
    reads every real token (PEFT's CorDA reads whole samples), LoRA-GA the training loss's mean
    gradient."""
    batches = calibration(args, tokenizer, examples)
    if lora.init == "corda":
        method = args.corda_method or "ipm"
        out = lj.init_corda(lora, params, forward(model), batches, mask=lambda b: b["attention_mask"], method=method)
        log(f"init corda ({method}, {len(batches)} batches): the adapters start from W0's components along its "
            "inputs' covariance; LoRA trains on the residual weights")
        return out
    per_batch = objective(args, model, None, examples)

    def mean_loss(p, batch):
        total, count = per_batch(p, None, batch, None)
        return total / jnp.maximum(count, 1)
    out = lj.init_lora_ga(lora, params, mean_loss, batches, seed=args.seed)
    log(f"init lora_ga ({len(batches)} batches): the adapters start from the directions of the first gradients; "
        "LoRA trains on the residual weights")
    return out


def _targets_per_row(rows, full_sequence: bool, max_len: int) -> int:
    if full_sequence:
        return max_len
    most = max(r.targets for r in rows)
    return min(max_len, 8 * math.ceil(most / 8))  # a multiple of 8: one shape for every batch


def alora_kwargs(tokens: jax.Array | None) -> dict[str, Any]:
    """The keywords of the LoRA model's apply for aLoRA's token mask [B, T] (None: not aLoRA): the
    mask spans every token of every adapted layer, so the last layer keeps all its rows too."""
    return {} if tokens is None else {"lora_mask": tokens, "trim_last_layer": False}


def lora_logits(model, lora: lj.LoraConfig) -> Callable[..., jax.Array]:
    """`target_loss`'s logits_fn for the LoRA model: dropout when training (an rng is given), aLoRA's
    tokens found in each row, or in each packed sequence."""
    g = lj.apply(model.apply, lora)

    def logits(p, a, ids, mask, rng, pos, **rows):
        tokens = None if lora.alora_invocation_tokens is None else lj.alora_mask(lora, ids, **rows)
        return g(p, a, ids, mask, positions=pos, lora_rng=rng if lora.dropout > 0 else None,
                 vocab_multiple=VOCAB_MULTIPLE, **alora_kwargs(tokens), **rows)
    return logits


def train(args, model, params, tokenizer, examples, *, lora: lj.LoraConfig | None, lr: float,
          out: Path, tag: str, log, adapters=None, val_examples=()) -> tuple[Any, Any, list[dict], bool]:
    """Train LoRA adapters (or, with lora=None, every parameter) on `examples` (`training_rows`: one
    example a row, or packed). With --eval-every, the mean answer-token loss on `val_examples`
    (encoded as training examples, packed with --packing) is logged as it trains.

    Returns (params, adapters, history, finished); finished is False after --stop-after, True after
    --early-stopping.
    """
    key = jax.random.key(args.seed)
    if lora is not None:
        if adapters is None:
            adapters = lj.init(lora, params, jax.random.fold_in(key, 1))
        if lora.velora_num_groups is not None and lora.velora_init_type == "batch_average_once" and not any(
                np.asarray(ab[lj.velora.EMBED]).any() for ab in adapters.values() if lj.velora.EMBED in ab):
            # PEFT takes the projection from the first training batch: the one the stream below starts with
            # (a resumed run restores the one it took)
            first = next(data.train_batches(examples, batch_size=args.batch_size * args.grad_accum,
                                            buckets=data.bucket_lengths(args.max_len),
                                            pad_id=data.pad_id_of(tokenizer), seed=args.seed,
                                            make_batch=batch_maker(args)))[1]
            adapters = lj.velora.init_once(lora, params, forward(model), first, adapters)
            log("VeLoRA: each adapted matrix's projection fixed from the first training batch")
        trainable, frozen = lj.split(lora, params, adapters)
        log(str(lj.summary(lora, params, adapters)))
        if args.lorafa:
            n_a = sum(ab["lora_A"].size for ab in adapters.values() if "lora_A" in ab)
            log(f"LoRA-FA: lora_A frozen at its start ({n_a:,} of those params), lora_B's gradient projected "
                "through it")
        if lora.init == "mica":
            n_b = sum(ab["lora_B"].size for ab in adapters.values() if "lora_B" in ab)
            log(f"MiCA: lora_B fixed at W0's minor singular directions ({n_b:,} of those params), lora_A trains")
    else:
        trainable, frozen = {"adapters": {}, "params": params}, jax.tree.map(lambda _: None, params)
    cfg = StepConfig(accum=args.grad_accum, micro_batch=args.batch_size, parallel=args.parallel)
    lr_at = make_schedule(lr, steps=args.steps, warmup=args.warmup, kind=args.lr_scheduler)  # for the log
    tx = make_optimizer(lr, steps=args.steps, warmup=args.warmup, weight_decay=args.weight_decay, clip=args.clip,
                        schedule=args.lr_scheduler,
                        loraplus_ratio=args.loraplus_ratio if lora is not None else None,
                        lorafa=lora if lora is not None and args.lorafa else None,
                        mica=lora if lora is not None and lora.init == "mica" else None,
                        adalora=lora if lora is not None and lora.adalora is not None else None)
    regularizer = None
    if lora is not None and (lora.use_kasa or lora.adalora is not None):
        regularizer = functools.partial(lj.kasa_loss if lora.use_kasa else lj.adalora.orth_loss, lora)
    rows = args.batch_size * args.grad_accum
    pad, buckets = data.pad_id_of(tokenizer), data.bucket_lengths(args.max_len)
    # with --packing the validation rows are packed too: the same loss terms, fewer rows to run
    val_rows = data.pack(val_examples, args.max_len) if args.packing and val_examples else tuple(val_examples)
    make_batch = batch_maker(args)
    val_batches = [make_batch(val_rows[i:i + rows], rows, buckets, pad)
                   for i in range(0, len(val_rows), rows)] if args.eval_every else []
    val_loss = objective(args, model, lora, val_rows) if val_batches else None
    runner = Runner(objective(args, model, lora, examples), tx, cfg, regularizer=regularizer, eval_loss_fn=val_loss)
    opt_state = tx.init(trainable)
    ckpt = TrainCheckpoints(out / "checkpoints" / tag)
    primary = jax.process_index() == 0
    # --keep-best: the trainable leaves of the lowest validation loss so far, kept on disk so --resume sees them;
    # an older best goes once a training checkpoint follows the newer one (a resume may lose the newer)
    best = TrainCheckpoints(out / "checkpoints" / f"{tag}_best", keep=None) if args.keep_best else None
    best_step, best_loss = None, math.inf
    start = 0
    per_epoch = data.batches_per_epoch(len(examples), rows)
    if args.resume and ckpt.latest_step() is not None:
        trainable, opt_state, meta = ckpt.restore(trainable, opt_state)
        start = int(meta["step"])
        check_resumable(args, tag, start, meta, rows, len(examples), data.DataPosition.from_step(start, per_epoch))
        log(f"resumed {tag} from step {start} ({ckpt.directory})")
        if primary:
            report.drop_metrics_after(out / "metrics.jsonl", tag, start)  # those of the lost steps
    elif args.resume:
        log(f"--resume: no checkpoint for {tag} under {ckpt.directory}; starting from step 0")
    if best is not None:  # the best of the steps before `start` (one saved after it belongs to a lost future)
        best.drop_after(start)
        best_step = best.latest_step()
        best_loss = math.inf if best_step is None else float(best.read_meta(best_step)["val_loss"])
        if start and best_step is not None:
            log(f"{tag}: --keep-best: the lowest validation loss so far is step {best_step}'s ({best_loss:.4f})")
    # --early-stopping: evaluations since the best one (so far: those after it up to `start`)
    waited = 0 if best_step is None else sum(1 for k in range(best_step + 1, start + 1)
                                             if k % args.eval_every == 0 or k == args.steps)
    stopped = start if args.early_stopping and waited >= args.early_stopping else None
    if stopped is not None:
        log(f"{tag}: --early-stopping stopped this run at step {start} already ({waited} evaluations after step "
            f"{best_step})")
    trainable_d, opt_d = runner.put_state(trainable, opt_state)
    frozen_d = runner.put_frozen(frozen)
    if args.parallel == "fsdp":
        held = lj.sharding.bytes_per_device((trainable_d, opt_d, frozen_d))
        whole = sum(x.nbytes for x in jax.tree.leaves((trainable, opt_state, frozen)))
        log(f"{tag}: fsdp over {jax.device_count()} devices: {held / 2**20:.2f} MiB of weights and optimizer "
            f"state per device ({whole / 2**20:.2f} MiB in all)")

    stream = data.train_batches(examples, batch_size=rows, buckets=buckets, pad_id=pad, seed=args.seed,
                                start=data.DataPosition.from_step(start, per_epoch), make_batch=make_batch)
    history: list[dict] = []
    metrics_file = (out / "metrics.jsonl").open("a") if primary else None
    bar = report.progress(args.steps, start, tag, disable=args.no_progress or not primary)
    skipped, speed = 0, "-"
    t_last, tok_since = time.perf_counter(), 0
    val_placed = runner.put_batches(val_batches)  # once: the same batches at every evaluation

    def record(rec: dict) -> None:
        history.append(rec)
        if metrics_file is not None:
            metrics_file.write(report.json_line(rec))
            metrics_file.flush()
    end = args.steps if args.stop_after is None else min(args.steps, start + args.stop_after)
    try:
        for step in range(start, end if stopped is None else start):
            pos, batch = next(stream)
            rng = np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.fold_in(key, 2), step)))
            new_t, new_o, m = runner.step(trainable_d, frozen_d, opt_d, batch, rng)
            loss = float(m["loss"])
            tok_since += int(batch["attention_mask"].sum())
            if not (math.isfinite(loss) and math.isfinite(float(m["grad_norm"]))):
                # apply_if_finite left params and optimizer state as they were
                skipped += 1
                if not args.skip_nonfinite:
                    raise NonFiniteError(
                        f"{tag}: non-finite loss/gradient at step {step + 1} (loss={loss}); the last good "
                        f"checkpoint is kept in {ckpt.directory} (pass --skip-nonfinite to skip such steps)")
            trainable_d, opt_d = new_t, new_o
            done = step + 1
            if done % args.log_every == 0 or done == args.steps:
                now = time.perf_counter()
                rec = {"run": tag, "step": done, "loss": loss, "grad_norm": float(m["grad_norm"]),
                       "lr": float(lr_at(step)),  # the rate of this update (lora_B's under LoRA+ is a multiple)
                       "tokens_per_s": tok_since / (now - t_last), "skipped_nonfinite": skipped}
                if "regularizer" in m:
                    rec["regularizer"] = float(m["regularizer"])
                record(rec)
                t_last, tok_since, speed = now, 0, f"{rec['tokens_per_s']:.0f}"
            if val_placed and (done % args.eval_every == 0 or done == args.steps):
                v, n = runner.evaluate(trainable_d, frozen_d, val_placed)
                record({"run": tag, "step": done, "val_loss": v, "val_tokens": n})
                log(f"{tag} step {done}: validation loss {v:.4f} ({n} answer tokens)")
                if best is not None and v < best_loss:
                    best_step, best_loss, waited = done, v, 0
                    best.save(done, runner.get_state(trainable_d, opt_d)[0], {}, {"val_loss": v})
                else:
                    waited += 1
                if args.early_stopping and waited >= args.early_stopping and done < args.steps:
                    stopped = done
                    log(f"{tag}: --early-stopping: no lower validation loss in {waited} evaluations since step "
                        f"{best_step}; training stops at step {done} of {args.steps}")
                t_last = time.perf_counter()  # the evaluation is not training throughput
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=speed)
            if done % args.checkpoint_every == 0 or done == end or stopped is not None:
                t_host, o_host = runner.get_state(trainable_d, opt_d)
                nxt = data.DataPosition.from_step(done, per_epoch)
                ckpt.save(done, t_host, o_host, {"epoch": nxt.epoch, "index": nxt.index, "seed": args.seed,
                                                 "rows": rows, "examples": len(examples)})
                if best is not None and best_step is not None:
                    best.drop_before(best_step)
            if stopped is not None:
                break
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()
        ckpt.close()
    if skipped:
        log(f"{tag}: skipped {skipped} steps with a non-finite loss or gradient")
    t_host, _ = runner.get_state(trainable_d, opt_d)
    finished = end == args.steps or stopped is not None
    if stopped is not None:
        history.append({"run": tag, "early_stop": stopped})
    if best is not None:
        if finished and best_step is not None:
            if best_step != end:
                t_host = best.restore(t_host, {}, best_step)[0]
            last = end if stopped is None else stopped
            log(f"{tag}: --keep-best keeps step {best_step} of {last}, the lowest validation loss ({best_loss:.4f})")
            history.append({"run": tag, "best_step": best_step, "best_val_loss": best_loss})
        best.close()
    new_params, adapters = lj.join(t_host, frozen) if lora is not None else (t_host["params"], {})
    return new_params, adapters, history, finished


def check_resumable(args, tag: str, step: int, meta: dict, rows: int, examples: int, position) -> None:
    """--resume goes on with the data stream the checkpoint left: the same --seed, the same rows
    per step (--batch-size x --grad-accum), which place it at the same epoch and batch, and the
    same number of training examples (or packed rows), which the shuffle depends on."""
    saved = {k: meta.get(k) for k in ("seed", "rows", "examples", "epoch", "index")}
    now = {"seed": args.seed, "rows": rows if "rows" in meta else None,  # (older checkpoints hold neither
           "examples": examples if "examples" in meta else None,        # rows nor examples)
           "epoch": position.epoch, "index": position.index}
    if saved != now:
        raise ValueError(f"--resume: {tag}'s checkpoint at step {step} was taken with --seed {saved['seed']}"
                         + (f", {saved['rows']} rows a step" if saved["rows"] is not None else "")
                         + (f", {saved['examples']} training examples" if saved["examples"] is not None else "")
                         + f" (next batch: epoch {saved['epoch']}, batch {saved['index']}); this run has --seed "
                         f"{args.seed}, {rows} rows a step (--batch-size x --grad-accum), {examples} training "
                         f"examples (--train-samples, --max-len, --packing; epoch {position.epoch}, batch "
                         f"{position.index}): resume with the flags it was trained with")


def for_eval(args, params):
    """The params to score: under --parallel fsdp split over the devices as in training, since a
    model that needs FSDP to train does not fit one device to generate either."""
    return put_fsdp(params) if args.parallel == "fsdp" else params


def init_distributed(args) -> None:
    """Join a multi-process run (before any JAX computation) when flags or environment ask."""
    if not (args.coordinator or args.distributed):
        return
    # Cross-process collectives on CPU need gloo; GPU/TPU backends ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if args.coordinator:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    else:
        jax.distributed.initialize()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole job; returns the summary it also writes to summary.json."""
    t0 = time.perf_counter()
    init_distributed(args)
    primary = jax.process_index() == 0  # only process 0 writes logs, metrics and exports
    log = report.logger(args.no_progress) if primary else (lambda _msg: None)
    # Everything that can reject the input runs before the output directory is created.
    model, params, tokenizer = load_model(args)
    train_ex, val_ex, val_records, squad_v2 = load_data(args, tokenizer, log)
    val_loss_ex = loss_examples(args, tokenizer, val_records, log, val_ex)
    check_positions(args, model, {"training": train_ex, "validation": val_loss_ex},
                    prompts=() if args.extractive else val_ex)
    if args.batch_size % jax.device_count():  # the Runner's check, before anything is written
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by the {jax.device_count()} devices")
    adapters0 = None
    if args.init_adapter:
        lora, adapters0, params = load_init_adapter(args.init_adapter, params, model)
        log(f"starting from adapter {args.init_adapter} (r={lora.rank}, alpha={lora.alpha}, targets={lora.targets})")
    else:
        lora = lora_config(args, model, tokenizer)
        lj.target_paths(lora, params)  # also refuses an odd rank for --init orthogonal
    check_head(args, lora, params)
    check_invocation(lora, {"training": train_ex, "validation": val_ex})
    train_rows = training_rows(args, train_ex, log)
    if args.reduce_intruders is not None and (lora.use_dora or lora.use_kasa or lora.use_bdlora is not None):
        what = ("a DoRA adapter, whose trained magnitude belongs to the directions the reduction changes"
                if lora.use_dora else "a KaSA adapter, whose diagonal belongs to the directions the reduction "
                "changes" if lora.use_kasa else "a BD-LoRA adapter, whose blocks the reduction's new factors break")
        raise ValueError(f"--reduce-intruders: --init-adapter {args.init_adapter} is {what}")
    if args.lorafa and (lora.use_kasa or lora.init == "mica" or lora.use_bdlora is not None):
        what = ("a KaSA adapter, whose diagonal LoRA-FA does not train" if lora.use_kasa else
                "a MiCA adapter, whose lora_A LoRA-FA does not train" if lora.init == "mica" else
                "a BD-LoRA adapter, whose blocks LoRA-FA's projection of lora_B's gradient does not keep")
        raise ValueError(f"--lorafa: --init-adapter {args.init_adapter} is {what}")
    # A checkpoint saved from a bitsandbytes 4- or 8-bit model loads with quantized linear weights.
    prequantized = next((x.scheme for x in lj.tree.flatten(params).values() if isinstance(x, quant.QuantizedArray)),
                        None)
    conflicts = [f for f, on in (("--full-finetune", args.full_finetune),
                                 (f"--quantize {args.quantize}", args.quantize),
                                 (f"--init {lora.init}", lora.changes_base or args.init == "eva"),
                                 ("KaSA", lora.use_kasa)) if on]
    if prequantized and conflicts:
        raise ValueError(f"--model {args.model}: its linear weights are already {QUANTIZED[prequantized]}, which "
                         f"{', '.join(conflicts)} cannot take (they need the full-precision weights)")
    train_params = params  # what LoRA trains on: the base, or PiSSA / OLoRA / CorDA / LoRA-GA's residual of it
    if lora.changes_base and args.init_adapter:
        raise ValueError(f"--init-adapter {args.init_adapter}: its adapters (init={lora.init!r}) act on residual "
                         "weights this run cannot rebuild; save them with lora_jax.to_plain first")
    if lora.init in ("corda", "lora_ga"):
        train_params, adapters0 = residual_data_init(args, model, params, tokenizer, train_rows, lora, log)
    elif lora.changes_base:
        train_params, adapters0 = lj.init_residual(lora, params, jax.random.fold_in(jax.random.key(args.seed), 1))
        log(f"init {lora.init}: the adapters start from the targeted weights' principal part; LoRA trains on the "
            "residual weights")
    if lora.use_kasa:  # the base a KaSA adapter acts on: its r smallest singular components dropped
        if adapters0 is None:
            train_params, adapters0 = lj.init_kasa(lora, params, jax.random.fold_in(jax.random.key(args.seed), 1))
        else:
            train_params = lj.kasa_base(lora, params)
        log("kasa: the adapted weights lose their r smallest singular components, the base that KaSA's "
            "s * A diag(d) B acts on")
    if lora.init == "eva" and not args.init_adapter:
        lora, adapters0 = eva_init(args, model, params, tokenizer, train_rows, lora, log)
    base_apply, scheme = model.apply, None
    if prequantized:
        scheme, base_apply = f"{prequantized} checkpoint", quant.apply(model.apply)
        log(f"{scheme}: frozen params {quant.nbytes(params) / 2**20:.2f} MiB")
    if args.quantize:
        scheme = args.quantize + (" + double quant" if args.double_quant else "")
        dense_bytes = quant.nbytes(params)
        q = lambda p: quant.quantize(p, block_size=args.quant_block_size, double_quant=args.double_quant,  # noqa: E731
                                     scheme=args.quantize)
        if args.init == "loftq":  # the base and the adapters together: every linear weight NF4, as q() gives it
            n = args.loftq_iter or 1
            params_q, adapters0 = lj.init_loftq(lora, params, iters=n, block_size=args.quant_block_size or 64,
                                                double_quant=args.double_quant)
            log(f"init loftq ({n} iteration{'s' if n > 1 else ''}): the NF4 codes and the adapters fit the "
                "full-precision weights together")
        else:
            params_q = q(params)
        train_params = params_q if train_params is params else q(train_params)
        params = params_q
        base_apply = quant.apply(model.apply)
        log(f"{scheme}: frozen params {dense_bytes / 2**20:.2f} MiB -> {quant.nbytes(params) / 2**20:.2f} MiB")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not args.resume and not args.eval_only:  # a fresh run: an earlier run's metrics and checkpoints go
        if primary and (out / "metrics.jsonl").exists():
            (out / "metrics.jsonl").unlink()
        if primary and (out / "checkpoints").exists():
            # orbax skips saving a step that exists, and --resume takes the latest: stale ones must not stay
            shutil.rmtree(out / "checkpoints")
            log(f"removed the checkpoints of an earlier run in {out / 'checkpoints'} (no --resume)")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("lora_jax: earlier checkpoints removed")

    results: dict[str, dict] = {}
    samples: dict[str, dict[str, str]] = {}
    odds: dict[str, dict[str, float]] = {}  # --extractive on v2.0: {run: run_qa.py's null odds}

    def score(name: str, apply_fn, p) -> None:
        """results[name], samples[name] (and odds[name]) of the model `apply_fn(p, ...)`."""
        if args.extractive:
            results[name], samples[name], null_odds = extractive.evaluate(
                apply_fn, p, val_ex, val_records, batch_size=args.eval_batch_size,
                buckets=data.bucket_lengths(args.max_len), pad_id=data.pad_id_of(tokenizer),
                max_answer_len=args.max_answer_length, v2=squad_v2, null_threshold=args.null_score_diff_threshold)
            if null_odds is not None:
                odds[name] = null_odds
        else:
            results[name], samples[name] = evaluate(
                apply_fn, p, model, tokenizer, val_ex, val_records, batch_size=args.eval_batch_size,
                buckets=data.bucket_lengths(args.max_len), max_new_tokens=args.max_new_tokens,
                num_beams=args.num_beams, length_penalty=args.length_penalty, v2=squad_v2)
    seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def timed(name: str):
        t = time.perf_counter()
        yield
        seconds[name] = round(time.perf_counter() - t, 1)

    if not args.no_base_eval:
        log("scoring the base model ...")
        with timed("eval_base"):
            score("base", base_apply, for_eval(args, params))
    history: list[dict] = []
    if args.eval_only:  # score --init-adapter's adapter as it is (if one was given)
        lora_params, adapters = train_params, adapters0
    else:
        with timed("train_lora"):
            lora_params, adapters, history, finished = train(args, model, train_params, tokenizer, train_rows,
                                                             lora=lora, lr=args.lr, out=out, tag="lora", log=log,
                                                             adapters=adapters0, val_examples=val_loss_ex)
        if not finished:
            log(f"stopped after {args.stop_after} steps (--stop-after); continue with --resume --output-dir {out}")
            return {"stopped": True, "scores": results}
        if lora.adalora is not None:
            alloc = adalora_ranks(lora, adapters)
            log(f"AdaLoRA: {alloc['kept']} of {alloc['initial']} triplets kept (target {lora.adalora.target_r} per "
                f"matrix); ranks {alloc['ranks']}")
    g = lj.apply(model.apply, lora)

    def lora_apply(pa, ids, *a, **k):
        # pa = (params, adapters): the adapters are arguments of the compiled scoring, so another adapter
        # reuses it (closed over, they would be baked in as constants and each would compile anew)
        if lora.alora_invocation_tokens is not None:  # prefill: from the invocation on; new tokens: all
            # (check_invocation made sure every prompt holds it)
            k |= alora_kwargs(lj.alora_mask(lora, ids) if ids.shape[1] > 1 else jnp.ones(ids.shape, bool))
        return g(*pa, ids, *a, **k)
    if adapters is not None:
        log(f"scoring the {'adapter ' + args.init_adapter if args.eval_only else 'LoRA model'} ...")
        with timed("eval_lora"):
            score("lora", lora_apply, for_eval(args, (lora_params, adapters)))
    reduced = None
    if args.reduce_intruders is not None:
        with timed("reduce_intruders"):
            reduced, intruders = reduce_intruders(args, lora, lora_params, adapters, log)
            log("scoring the adapter with its intruder dimensions reduced ...")
            score("reduced", lora_apply, for_eval(args, (lora_params, reduced)))
            texts = list(dict.fromkeys(r.context for r in val_records))  # distinct, in order
            text_kw = dict(max_len=args.max_len, batch_size=args.eval_batch_size)
            context_loss = {"base": text_loss(base_apply, for_eval(args, params), tokenizer, texts, **text_kw)} | {
                name: text_loss(lora_apply, for_eval(args, (lora_params, ab)), tokenizer, texts, **text_kw)
                for name, ab in (("lora", adapters), ("reduced", reduced))}
            log("LM loss on the validation contexts: " + ", ".join(f"{k} {v:.3f}" for k, v in context_loss.items()))
    if args.full_finetune:
        with timed("train_full"):
            full_params, _, full_hist, full_done = train(args, model, params, tokenizer, train_rows, lora=None,
                                                         lr=args.full_lr, out=out, tag="full", log=log,
                                                         val_examples=val_loss_ex)
        if not full_done:  # as LoRA's: nothing scored or written until it has trained all its steps
            log(f"stopped the full fine-tuning after {args.stop_after} steps (--stop-after); continue with --resume "
                f"--output-dir {out}")
            return {"stopped": True, "scores": results}
        history += full_hist
        log("scoring the fully fine-tuned model ...")
        with timed("eval_full"):
            score("full", model.apply, for_eval(args, full_params))

    base_name, revision = str(args.model or EMBEDDED_MODEL), args.revision
    if args.init == "loftq" and primary:  # its adapters belong with its base: PEFT's LoftQ workflow
        # the dequantized weights: loaded in 4 bits (bitsandbytes, --quantize nf4) they give back the same codes
        from lora_jax.peft import save_checkpoint
        base_name = str(save_checkpoint(out / "loftq_base", model.config, params, tokenizer=tokenizer, overwrite=True))
        revision = None
    saved = save_adapter(out, lora, lora_params, adapters, model, base_name, args.export_dtype,
                         initial=adapters0, revision=revision) if primary and not args.eval_only else {}
    if reduced is not None:
        kept = save_adapter(out, lora, lora_params, reduced, model, base_name, args.export_dtype, initial=adapters0,
                            suffix="_reduced", revision=revision) if primary else {}
        intruders |= {"mitigation_lambda": args.reduce_intruders, "context_loss": context_loss, **kept}
    summ = lj.summary(lora, lora_params, adapters) if adapters is not None else None

    def per_run(key: str) -> dict[str, Any] | None:
        """{run: the last value of `key` in its history} (val_loss; best_step for --keep-best; early_stop)."""
        return {r["run"]: r[key] for r in history if key in r} or None
    summary = {
        "model": str(args.model or "embedded world model"), "revision": args.revision,
        "data": str(args.data or "embedded world QA"),
        "steps": 0 if args.eval_only else args.steps, "eval_only": args.eval_only, "adapter": args.init_adapter,
        "parallel": args.parallel, "quantize": scheme, "init": args.init if args.init == "loftq" else lora.init,
        "loraplus_ratio": args.loraplus_ratio, "lorafa": args.lorafa, "kasa": lora.use_kasa,
        "adalora": adalora_ranks(lora, adapters),
        "bdlora": lora.use_bdlora and dataclasses.asdict(lora.use_bdlora),
        "alora_invocation_tokens": lora.alora_invocation_tokens and list(lora.alora_invocation_tokens),
        "trainable_params": summ and summ.trainable, "total_params": summ and summ.total,
        "trainable_percent": summ and summ.percent, "scores": results, **saved,
        "val_loss": per_run("val_loss"), "best_step": per_run("best_step"), "early_stop": per_run("early_stop"),
        "wall_time_s": time.perf_counter() - t0, "seconds": seconds,
        "eval_questions": len(val_records),  # those without a prompt (or feature) score 0
        "num_beams": args.num_beams, "length_penalty": args.length_penalty if args.num_beams > 1 else None,
        "squad_version": "2.0" if squad_v2 else "1.1", "lr_scheduler": args.lr_scheduler,
        "packing": {"examples": len(train_ex), "rows": len(train_rows)} if args.packing else None,
        "task": "extractive" if args.extractive else "generative",
        "prompt_template": None if args.extractive else args.prompt_template,
        "train_examples": len({e.id for e in train_ex}) if args.extractive else len(train_ex),
        "features": {"train": len(train_ex), "validation": len(val_ex)} if args.extractive else None,
        "reduce_intruders": intruders if reduced is not None else None,
    }
    if primary:
        for name, preds in samples.items():  # {id: answer}: the official evaluate-v1.1.py / v2.0.py input
            write_json(out / f"predictions_{name}.json", preds)
        for name, null_odds in odds.items():  # {id: null score - best span score}: evaluate-v2.0.py's na_prob file
            write_json(out / f"null_odds_{name}.json", null_odds)
        stale = [f for kind, runs in (("predictions", samples), ("null_odds", odds)) for f in
                 sorted(out.glob(f"{kind}_*.json")) if f.stem.removeprefix(kind + "_") in RUNS - set(runs)]
        for f in stale:  # an earlier run's, of a model this run did not score: it would pass for this run's
            f.unlink()
        if stale:
            log(f"removed {len(stale)} file(s) of an earlier run in {out}: {', '.join(f.name for f in stale)}")
        write_json(out / "summary.json", summary)
        if not args.eval_only:
            report.loss_plot(out / "metrics.jsonl", out / "loss.png")
        print(report.table(summary, samples, val_records))
    return summary
