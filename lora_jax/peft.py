"""Hugging Face PEFT interop: adapters to and from PEFT's on-disk format, and merged HF export.

    save_peft("out/adapter", config, adapters, model_config=model.config, params=params, dtype="float16")
    # torch: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "out/adapter")
    got = load_peft("peft_dir", params, model_config=model.config)    # config, adapters, extras
    save_merged("out/merged", model.config, params, config, adapters)   # plain HF checkpoint
    save_checkpoint("out/base", model.config, params, tokenizer=tok)     # the params alone (NF4 dequantized)

PEFT layout (GPT-2 and BLOOM alike): `base_model.model.<module>.lora_A.weight` is (r, in) and
`.lora_B.weight` is (out, r), i.e. our [in, r] / [r, out] factors transposed, whatever the base
weight's orientation; GPT-2's Conv1D only sets `fan_in_fan_out: true`. Stacked (scanned)
adapters [L, ...] are written per layer (`transformer.h.{i}...`) and stacked again on import
when the base is scanned. An embedding table's adapter is PEFT's `lora_embedding_A` (r, V) /
`lora_embedding_B` (D, r); where that table is also the LM head (GPT-2's `wte`, BLOOM's
`word_embeddings`), lora_jax applies W0 + s*A*B in both places, as PEFT's merged model does;
PEFT's unmerged model applies it to the lookup alone (its `ensure_weight_tying` ties only
modules named `embed_tokens` / `lm_head`), and both directions warn of it. Fully trained
leaves are written the way PEFT writes them: biases (`bias: all / lora_only`; a LoRA module's
bias as `<module>.base_layer.bias`) and whole modules (`trainable` -> `modules_to_save`,
`<module>.weight` / `.bias`). DoRA (`use_dora`) adds `<module>.lora_magnitude_vector` (out,) per adapted module, KaSA (`use_kasa`, PEFT's
`kasa_config`) `<module>.lora_diag` (r,); a KaSA adapter acts on the truncated base
`kasa.kasa_base` rebuilds from the stock one, as PEFT does on load. Trained embedding rows
(`trainable_tokens`) are PEFT's `trainable_token_indices`, stored as the rows themselves in
`<table>.token_adapter.trainable_tokens_delta` (n, D). An AdaLoRA adapter (peft_type "ADALORA",
`LoraConfig.adalora`) is `<module>.lora_A` (k, in), `.lora_B` (out, k) and `.lora_E` (k, 1), the
k triplets its `rank_pattern` (a bool per initial rank) keeps; on import they go back to their
places among init_r, the pruned ones zero. A BD-LoRA adapter (`use_bdlora`) holds only the
diagonal blocks of its block-diagonal factor, stacked along the rows: lora_A (r, in/n) or lora_B
(out, r/n) for n blocks; here that factor is the full block-diagonal matrix. A `SequenceClassifier`'s adapter is
PEFT's SEQ_CLS task, its `score` head trained in full (`modules_to_save`); a `QuestionAnswering`'s
QUESTION_ANS (`qa_outputs`), a `TokenClassifier`'s TOKEN_CLS (`classifier`). `save_embedding_layers`
adds the embedding table (`<table>.weight`, or `.base_layer.weight` / `.token_adapter.base_layer.weight`
where PEFT wraps it), as PEFT does after a vocabulary resize; on import the table is an extra
leaf, and PEFT's `lm_head.*` copies of the tied table are checked and dropped.

Files are read through safetensors (or, for old `adapter_model.bin`, `torch.load(weights_only=
True)`); a truncated or corrupted file raises a ValueError naming it. Every export is written
to a temporary directory renamed into place.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import bdlora, tree, velora
from .checkpoint import MANIFEST, AdapterCheckpoint, atomic_directory, read_json, trainable_leaves
from .checkpoint import load as checkpoint_load
from .config import VELORA_INIT_TYPES, AdaLoraSchedule, BdLoraConfig, LoraConfig
from .kasa import BASE_WARNING
from .lazy import column_norms, dense
from .lora import (ADALORA_E, KASA_DIAG, LORA_BIAS, MAGNITUDE, TOKENS, Adapters, check_adapters, diag_key, layer_gate,
                   merge, resolve_tokens, target_paths, token_rows, velora_fixed)
from .models.common import SCORE, BaseConfig, CausalLM
from .models.heads import CLASSIFIER, QA_OUTPUTS
from .models.hf import (
    hf_key_to_path,
    params_to_hf_state_dict,
    path_to_hf_key,
    read_tensors,
    resolve_pretrained_dir,
    write_hf_files,
)
from .residual import check_plain

PyTree = Any
PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"
LAYERS_KEY = "h"  # the path component holding the layer stack: transformer/h/{i}/...
_DTYPES = {"float32": np.float32, "fp32": np.float32, "float16": np.float16, "fp16": np.float16,
           "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16}
# PEFT options whose adapters are not plain LoRA (or that change the base weights).
_UNSUPPORTED = ("layer_replication", "target_parameters", "use_qalora")
SAMPLER = ".lora_monteclora_sampler."  # MonteCLoRA's training-time sampler: <module>.lora_monteclora_sampler.<name>
HEAD = "lm_head."  # PEFT's name of the (here always tied) LM head, which save_embedding_layers also writes
TOKEN_KEY = "token_adapter.trainable_tokens_delta"  # <table module>.token_adapter.trainable_tokens_delta: (n, D)
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
ADALORA = "ADALORA"  # PEFT's peft_type of an AdaLoRA adapter
_SCHEDULE = tuple(f.name for f in dataclasses.fields(AdaLoraSchedule))  # its AdaLoraConfig fields


class PeftAdapter(NamedTuple):
    """What `load_peft` returns; `extras` are fully trained leaves {path: array} (biases, modules)."""

    config: LoraConfig
    adapters: Adapters
    extras: dict[str, jax.Array]
    base_model_name_or_path: str | None
    base_model_revision: str | None = None  # adapter_config.json "revision": the base model's hub revision


def _np_dtype(dtype: Any) -> np.dtype:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
        dtype = _DTYPES[dtype]
    return np.dtype(dtype)


# ----------------------------------------------------------------------------- layer stacks


def _stack_dim(path: str, layers_key: str) -> int | None:
    """Index of the stack component if `path` is a stacked leaf (`.../h/attn/...`), else None."""
    parts = path.split("/")
    if layers_key in parts:
        j = parts.index(layers_key) + 1
        if j < len(parts) and not parts[j].isdigit():
            return j
    return None


def _insert_layer(path: str, i: int, layers_key: str) -> str:
    """`transformer/h/attn/c_attn/kernel`, 3 -> `transformer/h/3/attn/c_attn/kernel`."""
    j = _stack_dim(path, layers_key)
    if j is None:
        raise ValueError(f"{path!r} is stacked ([L, ...]) but has no {layers_key!r} component to unstack into")
    parts = path.split("/")
    return "/".join([*parts[:j], str(i), *parts[j:]])


def _remove_layer(path: str, layers_key: str) -> tuple[str, int] | None:
    """`transformer/h/3/attn/...` -> (`transformer/h/attn/...`, 3); None without a layer index."""
    parts = path.split("/")
    for j in range(len(parts) - 1):
        if parts[j] == layers_key and parts[j + 1].isdigit():
            return "/".join(parts[: j + 1] + parts[j + 2 :]), int(parts[j + 1])
    return None


def _unstack(path: str, x: Any, layers_key: str, stacked: bool) -> list[tuple[str, Any]]:
    if not stacked:
        return [(path, x)]
    return [(_insert_layer(path, i, layers_key), x[i]) for i in range(x.shape[0])]


def _is_embedding(path: str) -> bool:
    """A flax `nn.Embed` table ([V, D], looked up by row), which PEFT adapts as an Embedding."""
    return tree.leaf_name(path) == tree.EMBEDDING_NAME


def _is_tied_head(path: str, model_config: BaseConfig) -> bool:
    """Whether `path` is the embedding table that is also the LM head."""
    return _is_embedding(path) and path.split("/")[-2] == model_config.embed_name


_TIED_LOOKUP_ONLY = ("the LoRA on {!r} also acts in the tied LM head under lora_jax, as in PEFT's merged model "
                     "(merge_and_unload); PEFT's unmerged model applies it to the lookup only, so their logits "
                     "differ")


def _module(path: str) -> str:
    """`transformer/h/0/attn/c_attn/kernel` -> `transformer.h.0.attn.c_attn` (PEFT module name)."""
    return path.rsplit("/", 1)[0].replace("/", ".")


# ----------------------------------------------------------------------------- export


def _alpha(config: LoraConfig, path: str) -> float:
    r = config.rank_for(path)
    a = config.scale_for(path) * (math.sqrt(r) if config.use_rslora else r)
    return float(round(a)) if abs(a - round(a)) < 1e-9 else a


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


class _Layer(NamedTuple):
    path: str  # unrolled
    a: np.ndarray  # [in, r]
    b: np.ndarray  # [r, out]
    m: np.ndarray | None  # [out], DoRA
    bias: np.ndarray | None  # [out], lora_B's bias (lora_bias)
    d: np.ndarray | None  # [r], KaSA's or AdaLoRA's diagonal
    rank: int
    alpha: float
    v: np.ndarray | None = None  # [ceil(in/G)], VeLoRA's fixed projection


def _per_layer(config: LoraConfig, adapters: Mapping[str, Any], layers_key: str) -> list[_Layer]:
    """One entry per (layer, adapter), stacked adapters split per layer."""
    check_plain(config, "PEFT export")  # a PEFT reader puts the adapters on the stock base weights
    several = {k: v for k, v in config.axes_pattern.items() if tuple(v) != (1, 1)}
    if several:
        raise ValueError(f"PEFT export: axes_pattern {several} adapts kernels of several axes, which PEFT's "
                         "2-D Linear / Conv1D layers do not have")
    out = []
    for p in sorted(p for p in adapters if TOKENS not in adapters[p]):  # trained rows go out as themselves
        if tree.leaf_name(p) not in tree.WEIGHT_NAMES:
            raise ValueError(f"PEFT export: {p!r} is adapted as a parameter (target_parameters), which the "
                             "GPT-2 / BLOOM modules PEFT files describe do not hold")
        a, b = np.asarray(adapters[p]["lora_A"]), np.asarray(adapters[p]["lora_B"])
        if a.ndim not in (2, 3):
            raise ValueError(f"adapter {p!r} has lora_A {a.shape}: expected [in, r] or one stack dim [L, in, r]")
        stacked = a.ndim == 3
        # layers_to_transform: the stack's other layers hold zeros and are not PEFT modules
        gate = layer_gate(config, p, (*a.shape[:-1], b.shape[-1])) if stacked else None
        keep = [True] * (a.shape[0] if stacked else 1) if gate is None else list(gate)

        def per_layer(k: str | None) -> list[np.ndarray | None]:  # DoRA's magnitude, lora_B's bias [out], a diag [r]
            if k is None or k not in adapters[p]:
                return [None] * (a.shape[0] if stacked else 1)
            return [x for _, x in _unstack(p, np.asarray(adapters[p][k]), layers_key, stacked)]
        for (q, ai), (_, bi), m, bias, d, kept in zip(_unstack(p, a, layers_key, stacked),
                                                      _unstack(p, b, layers_key, stacked), per_layer(MAGNITUDE),
                                                      per_layer(LORA_BIAS), per_layer(diag_key(config)),
                                                      keep):
            if kept:
                out.append(_Layer(q, ai, bi, m, bias, d, config.rank_for(p), _alpha(config, p),
                                  np.asarray(adapters[p][velora.EMBED]) if velora.EMBED in adapters[p] else None))
    return out


@functools.lru_cache(maxsize=8)
def _module_names_of(model_config: BaseConfig) -> frozenset[str]:
    # Shapes only (jax.eval_shape): no weights are allocated, even for a 560M-parameter config.
    shapes = CausalLM(model_config.replace(scan_layers=False)).param_shapes()
    return frozenset(_module(p) for p in tree.flatten(shapes))


def _all_modules(params: PyTree | None, model_config: BaseConfig, layers_key: str) -> frozenset[str]:
    if params is None:
        return _module_names_of(model_config)
    names = set()
    for p, x in tree.flatten(params).items():
        if _stack_dim(p, layers_key) is None:
            names.add(_module(p))
        else:
            names |= {_module(_insert_layer(p, i, layers_key)) for i in range(x.shape[0])}
    return frozenset(names)


def _peft_layer(module: str, patterns: tuple[str, ...] | None) -> int | None:
    """The layer number PEFT's layers_to_transform reads from a module name (its check_target_module_exists):
    the first pattern that matches decides; PEFT puts it into its regex ungrouped, so an alternation
    (`h|blocks`) reads no number there."""
    m = None
    if not patterns:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    for pattern in patterns or ():
        if (m := re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)) is not None:
            break
    return None if m is None or m["idx"] is None else int(m["idx"])


def _peft_layers(config: LoraConfig, adapted: list[str]) -> tuple[list[int] | None, list[str] | None]:
    """(layers_to_transform, layers_pattern) for the PEFT config: the config's, when PEFT's reading
    of them keeps every adapted module (else none: target_modules then names each module)."""
    layers, patterns = config.layers_to_transform, config.layers_pattern
    if layers is None or any(_peft_layer(m, patterns) not in layers for m in adapted):
        return None, None
    return list(layers), None if patterns is None else list(patterns)


def _target_modules(adapted: list[str], all_modules: frozenset[str], layers: tuple[list[int] | None, Any]
                    ) -> list[str]:
    """Short names (`c_attn`) when PEFT's suffix match (and its layers_to_transform) selects exactly
    `adapted`, else full names."""
    short = sorted({m.rsplit(".", 1)[-1] for m in adapted})
    hits = {m for m in all_modules if any(m == s or m.endswith("." + s) for s in short)}
    if layers[0] is not None:
        hits = {m for m in hits if _peft_layer(m, layers[1]) in layers[0]}
    return short if hits == set(adapted) else sorted(adapted)


def _extras(config, adapters, params, model_config, layers_key) -> tuple[dict[str, np.ndarray], list[str]]:
    """PEFT keys of the fully trained leaves, and the `modules_to_save` list."""
    leaves = trainable_leaves(config, params)
    if not leaves:
        return {}, []
    flat = tree.flatten(params)
    lora_modules = {p.rsplit("/", 1)[0] for p in adapters}
    # `trainable` leaves go out as whole modules (modules_to_save); the rest are biases.
    saved = sorted({p.rsplit("/", 1)[0] for p in tree.select(config.trainable, leaves)})
    for m in saved:
        if m in lora_modules:
            raise ValueError(f"{m!r} has a LoRA adapter and is trained in full: PEFT's modules_to_save cannot hold it")
        if m.rsplit("/", 1)[-1] == model_config.embed_name:
            raise ValueError(f"{m!r} is the tied embedding / LM head: exporting it as modules_to_save "
                             "would untie it in PEFT")
    export = {p: flat[p] for p in flat if p.rsplit("/", 1)[0] in saved} | leaves
    state, modules = {}, set()
    for p, x in export.items():
        stacked = _stack_dim(p, layers_key) is not None
        module = p.rsplit("/", 1)[0]
        for q, xi in _unstack(p, np.asarray(jax.device_get(x)), layers_key, stacked):
            key, transpose = path_to_hf_key(model_config, tuple(q.split("/")))
            if module in lora_modules:  # PEFT wraps the base layer: <module>.base_layer.bias
                key = key.rsplit(".", 1)[0] + ".base_layer." + key.rsplit(".", 1)[1]
            state[PREFIX + key] = xi.T if transpose else xi  # torch orientation
            if module in saved:
                modules.add(_module(q))
    return state, sorted(modules)


def peft_state_dict(config: LoraConfig, adapters: Adapters, *, model_config: BaseConfig | None = None,
                    params: PyTree | None = None, dtype: Any = "float32",
                    layers_key: str = LAYERS_KEY, save_embedding_layers: bool = False) -> dict[str, np.ndarray]:
    """The tensors of `adapter_model.safetensors`: PEFT key names, (r, in) / (out, r), in `dtype`.

    `params` (and `model_config`) are needed only when `config` trains full leaves, or with
    `save_embedding_layers` (PEFT's option: the embedding table goes in too, as after resizing it).
    """
    dt = _np_dtype(dtype)
    state: dict[str, np.ndarray] = {}
    for layer in _per_layer(config, adapters, layers_key):
        module = _module(layer.path)
        if config.adalora is not None:  # parameters without ".weight"; only the kept triplets (E != 0)
            keep = layer.d != 0
            state[f"{PREFIX}{module}.lora_A"] = layer.a.T[keep]  # (k, in)
            state[f"{PREFIX}{module}.lora_B"] = layer.b.T[:, keep]  # (out, k)
            state[f"{PREFIX}{module}.{ADALORA_E}"] = layer.d[keep][:, None]  # (k, 1)
            continue
        # Embedding: lora_embedding_A (r, V), lora_embedding_B (D, r), parameters without ".weight".
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if _is_embedding(layer.path) else \
            ("lora_A.weight", "lora_B.weight")
        a, b, side = layer.a.T, layer.b.T, bdlora.side(config, layer.path)  # (r, in), (out, r)
        if side is not None:  # BD-LoRA: PEFT holds the diagonal blocks alone, (r, in/n) or (out, r/n)
            a, b = (bdlora.blocks(a, config.use_bdlora.nblocks), b) if side == "a" else \
                (a, bdlora.blocks(b, config.use_bdlora.nblocks))
        state[f"{PREFIX}{module}.{a_key}"] = a
        state[f"{PREFIX}{module}.{b_key}"] = b
        if layer.m is not None:
            state[f"{PREFIX}{module}.{MAGNITUDE}"] = layer.m  # (out,)
        if layer.bias is not None:
            state[f"{PREFIX}{module}.lora_B.bias"] = layer.bias  # (out,), scaled by s where PEFT adds it
        if layer.d is not None:
            state[f"{PREFIX}{module}.{KASA_DIAG}"] = layer.d  # (r,)
        if config.velora_num_groups is not None:  # PEFT's projection buffer: ours when fixed, else zeros as
            v = layer.v if layer.v is not None else np.zeros(  # batch_average starts it (it recomputes it)
                velora.width(layer.a.shape[0], config.velora_num_groups), np.float32)
            state[f"{PREFIX}{module}.{velora.EMBED}"] = v
    for p, ab in adapters.items():
        if TOKENS in ab:
            state[f"{PREFIX}{_module(p)}.{TOKEN_KEY}"] = np.asarray(jax.device_get(ab[TOKENS]))  # (n, D)
    if config.bias != "none" or config.trainable is not None:
        if params is None or model_config is None:
            raise ValueError(f"config trains full leaves (bias={config.bias!r}, trainable={config.trainable!r}); "
                             "pass params= and model_config= to export them")
        state.update(_extras(config, adapters, params, model_config, layers_key)[0])
    if save_embedding_layers:
        state.update(_embedding_layer(adapters, params, model_config))
    return {k: np.ascontiguousarray(v.astype(dt)) for k, v in state.items()}


def _embedding_layer(adapters: Adapters, params: PyTree | None, model_config: BaseConfig | None
                     ) -> dict[str, np.ndarray]:
    """{PEFT key: the embedding table}, keyed as PEFT's wrapped module names it (the tied LM head
    follows the table in PEFT, so its copy is left out)."""
    if params is None or model_config is None:
        raise ValueError("save_embedding_layers writes the embedding table: pass params= and model_config=")
    path = f"transformer/{model_config.embed_name}/embedding"
    table = tree.flatten(params)[path]
    if tree.is_value(table):
        raise ValueError(f"save_embedding_layers: {path!r} is {type(table).__name__}, not a dense table")
    wrapper = ("token_adapter.base_layer." if TOKENS in adapters.get(path, {}) else
               "base_layer." if path in adapters else "")
    return {f"{PREFIX}{_module(path)}.{wrapper}weight": np.asarray(jax.device_get(table))}


TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "QUESTION_ANS", "TOKEN_CLS")
HEAD_TASKS = {SCORE: "SEQ_CLS", QA_OUTPUTS: "QUESTION_ANS", CLASSIFIER: "TOKEN_CLS"}  # the head a task trains


def _task_type(adapters: Adapters, params: PyTree | None, task_type: str | None) -> str:
    """PEFT's task: the one of the task head that params or adapters hold (`score`: SEQ_CLS,
    `qa_outputs`: QUESTION_ANS, `classifier`: TOKEN_CLS), else CAUSAL_LM."""
    if task_type is None:
        return next((task for head, task in HEAD_TASKS.items()
                     if (isinstance(params, Mapping) and head in params)
                     or any(p.startswith(head + "/") for p in adapters)), "CAUSAL_LM")
    if task_type not in TASK_TYPES:
        raise ValueError(f"task_type must be one of {TASK_TYPES}, got {task_type!r}")
    return task_type


def _token_ids(config: LoraConfig, adapters: Adapters, params: PyTree | None) -> dict[str, tuple[int, ...]]:
    """{table path: token ids} of the trained rows in `adapters` (params, or the config's names, place them)."""
    paths = [p for p, ab in adapters.items() if TOKENS in ab]
    if not paths:
        return {}
    if params is not None:
        return {p: ids for p, ids in token_rows(config, params).items() if p in paths}
    if config.trainable_tokens is None:
        raise ValueError(f"adapters hold trained rows for {paths} but the config has no trainable_tokens")
    try:
        found = resolve_tokens(config.trainable_tokens, paths)
    except ValueError as e:
        raise ValueError(f"the trained rows of {paths} cannot be matched to trainable_tokens: {e}; "
                         "pass params=") from None
    if sorted(found) != sorted(paths):
        raise ValueError(f"the trained rows of {paths} cannot be matched to trainable_tokens="
                         f"{config.trainable_tokens!r}: pass params=")
    return found


def peft_refusal(config: LoraConfig, model_config: BaseConfig) -> str | None:
    """Why PEFT would refuse `config`'s adapter on this model, or None: its KaSA and BD-LoRA
    variants adapt nn.Linear layers only, not GPT-2's Conv1D (fan_in_fan_out) ones."""
    kind = "KaSA" if config.use_kasa else "BD-LoRA" if config.use_bdlora is not None else None
    if kind is None or model_config.hf_transpose_linear:
        return None
    return f"PEFT's {kind} takes nn.Linear layers only, not this model's Conv1D (fan_in_fan_out) ones"


def peft_config_dict(config: LoraConfig, adapters: Adapters, *, model_config: BaseConfig,
                     params: PyTree | None = None, base_model_name_or_path: str | None = None,
                     layers_key: str = LAYERS_KEY, task_type: str | None = None,
                     revision: str | None = None) -> dict[str, Any]:
    """The `adapter_config.json` dict that peft's LoraConfig (0.13 ... 0.21) reads; `task_type`
    defaults to the task of the head the params hold (SEQ_CLS, QUESTION_ANS, TOKEN_CLS), else CAUSAL_LM."""
    layers = _per_layer(config, adapters, layers_key)
    adapted = [_module(x.path) for x in layers]
    peft_layers = _peft_layers(config, adapted)
    rank_pattern = {re.escape(_module(x.path)): x.rank for x in layers if x.rank != config.rank}
    alpha_pattern = {re.escape(_module(x.path)): _num(x.alpha) for x in layers
                     if not math.isclose(x.alpha, config.alpha, rel_tol=1e-12)}
    modules = None
    if config.bias != "none" or config.trainable is not None:
        if params is None:
            raise ValueError("config trains full leaves: pass params= to export them")
        modules = _extras(config, adapters, params, model_config, layers_key)[1] or None
    cfg = {
        "peft_type": "LORA",
        "task_type": _task_type(adapters, params, task_type),
        "base_model_name_or_path": base_model_name_or_path or model_config.hf_config.get("_name_or_path") or None,
        "revision": revision,
        "inference_mode": True,
        "r": config.rank,
        "lora_alpha": _num(config.alpha),
        "target_modules": _target_modules(adapted, _all_modules(params, model_config, layers_key), peft_layers),
        "exclude_modules": None,
        "lora_dropout": config.dropout,
        # Conv1D (GPT-2) stores its weight (in, out); PEFT needs to know to transpose the delta.
        "fan_in_fan_out": not model_config.hf_transpose_linear,
        "bias": config.bias,
        "use_rslora": config.use_rslora,
        "modules_to_save": modules,
        # PEFT re-initialises, then loads the weights: the init names only how they started. True
        # (not "orthogonal" / "eva", which older PEFT versions reject) for all but "gaussian", and
        # "mica" (PEFT >= 0.21), which also keeps lora_B fixed when PEFT trains the adapter.
        "init_lora_weights": config.init if config.init in ("gaussian", "mica") else True,
        "layers_to_transform": peft_layers[0],
        "layers_pattern": peft_layers[1],
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_dora": config.use_dora,
        "lora_bias": config.lora_bias,
    }
    if config.adalora is not None:  # PEFT's AdaLoraConfig: init_r and the schedule; r is unused there
        cfg |= {"peft_type": ADALORA, "r": 8, "init_r": config.rank, "alpha_pattern": {},
                "rank_pattern": {f"{_module(x.path)}.{ADALORA_E}": (x.d != 0).tolist() for x in layers},
                **{k: _num(v) if isinstance(v, float) else v for k, v in dataclasses.asdict(config.adalora).items()}}
    if config.alora_invocation_tokens is not None:  # written only when set: older PEFT versions reject the key
        cfg["alora_invocation_tokens"] = list(config.alora_invocation_tokens)
    refusal = peft_refusal(config, model_config)
    if refusal:
        raise ValueError(f"PEFT export: {refusal} (GPT-2); the file would not load there")
    if config.use_bdlora is not None:  # likewise (PEFT 0.21's BdLoraConfig)
        cfg["use_bdlora"] = config.to_dict()["use_bdlora"]
    if config.use_kasa:  # likewise (PEFT 0.21's KasaConfig)
        cfg["kasa_config"] = {"beta": _num(config.kasa_beta), "gamma": _num(config.kasa_gamma)}
    if config.velora_num_groups is not None:  # likewise (PEFT 0.21's VeloraConfig)
        cfg["velora_config"] = {"num_groups": config.velora_num_groups, "scale": _num(config.velora_scale),
                                "init_type": config.velora_init_type}
    tokens = _token_ids(config, adapters, params)
    if tokens:
        # A list means the model's input embedding to PEFT (whose tied LM head follows it, as here).
        cfg["trainable_token_indices"] = (
            list(next(iter(tokens.values()))) if len(tokens) == 1 and _is_tied_head(next(iter(tokens)), model_config)
            else {_module(p): list(ids) for p, ids in tokens.items()})
    return cfg


def save_peft(directory: str | os.PathLike, config: LoraConfig, adapters: Adapters, *,
              model_config: BaseConfig, params: PyTree | None = None, dtype: Any = "float32",
              base_model_name_or_path: str | None = None, layers_key: str = LAYERS_KEY,
              task_type: str | None = None, save_embedding_layers: bool = False, overwrite: bool = False,
              revision: str | None = None) -> Path:
    """Write a PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`).

    Args:
      directory: written atomically; an existing one needs `overwrite=True`.
      config, adapters: the LoRA config and factors (stacked ones are written per layer).
      model_config: the base model's config (orientation, key names, base model name).
      params: the trained params; needed only when `config` trains full leaves. Without it the
        module list is computed from `model_config` shapes (no weights allocated).
      dtype: "float32" / "float16" / "bfloat16" (or a numpy/jax dtype) for the stored tensors.
      task_type: PEFT's task, CAUSAL_LM, SEQ_CLS, QUESTION_ANS or TOKEN_CLS (default: the task of
        the head `params` or `adapters` hold: `score` (`SequenceClassifier`) SEQ_CLS, `qa_outputs`
        (`QuestionAnswering`) QUESTION_ANS, `classifier` (`TokenClassifier`) TOKEN_CLS). PEFT's
        models for those tasks train the head in full: export it with `LoraConfig(trainable=<head>)`.
      save_embedding_layers: write the embedding table too (PEFT's option), e.g. after
        `models.resize_token_embeddings`: PEFT loads it into a base resized to the same size.
      revision: the base model's hub revision (the config's `revision`), where it is not `main`.
    Returns:
      the directory.
    """
    from safetensors.numpy import save_file

    state = peft_state_dict(config, adapters, model_config=model_config, params=params, dtype=dtype,
                            layers_key=layers_key, save_embedding_layers=save_embedding_layers)
    cfg = peft_config_dict(config, adapters, model_config=model_config, params=params,
                           base_model_name_or_path=base_model_name_or_path, layers_key=layers_key,
                           task_type=task_type, revision=revision)
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        save_file(state, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True))
    # No ensure_weight_tying in the file: PEFT 0.21 ties only modules named embed_tokens / lm_head
    # (it warns that the flag adds nothing for GPT-2's wte or BLOOM's word_embeddings).
    if tied := [p for p in adapters if _is_tied_head(p, model_config) and TOKENS not in adapters[p]]:
        warnings.warn(f"{directory}: {_TIED_LOOKUP_ONLY.format(tied[0])}", stacklevel=2)
    return Path(directory).expanduser()


# ----------------------------------------------------------------------------- import


# Linear: <module>.lora_A[.<adapter>].weight; Embedding: <module>.lora_embedding_A[.<adapter>].
_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?:(?P<ab>[AB])(?:\.[^.]+)?\.weight|embedding_(?P<eab>[AB])(?:\.[^.]+)?)")


_MAGNITUDE_KEY = re.compile(r"(?P<module>.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?")
_BIAS_KEY = re.compile(r"(?P<module>.+)\.lora_B(?:\.[^.]+)?\.bias")
_DIAG_KEY = re.compile(r"(?P<module>.+)\.lora_diag(?:\.[^.]+)?")
_EMBED_KEY = re.compile(r"(?P<module>.+)\.lora_velora_embed(?:\.[^.]+)?")  # VeLoRA's projection (in/G,)
_ADALORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<factor>[ABE])")  # AdaLoRA: parameters, no ".weight"


class _Factors(NamedTuple):
    """One imported adapter: A [*S, in, r], B [*S, r, out], its rank and scale, DoRA's magnitude
    and lora_B's bias [*S, out], KaSA's diagonal [*S, r] (or None)."""

    a: np.ndarray
    b: np.ndarray
    rank: int
    scale: float
    m: np.ndarray | None
    bias: np.ndarray | None
    d: np.ndarray | None


def _peft_pattern(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    # peft.utils.other.get_pattern_key: the first key k with re.match(rf"(.*\.)?({k})$", module).
    for k, v in patterns.items():
        if re.match(rf"(.*\.)?({k})$", module):
            return v
    return default


def _check_supported(path: Path, cfg: Mapping[str, Any]) -> None:
    if cfg.get("peft_type", "LORA") not in ("LORA", ADALORA):
        raise ValueError(f"{path}: peft_type {cfg['peft_type']!r} is not LoRA (nor AdaLoRA)")
    if cfg.get("peft_type") == ADALORA:
        missing = [k for k in ("init_r", "target_r", "total_step") if cfg.get(k) is None]
        if missing:
            raise ValueError(f"{path}: an AdaLoRA config needs {missing}")
    if cfg.get("arrow_config"):
        raise ValueError(f"{path}: an Arrow router (arrow_config) holds no adapter of its own: load the task "
                         "adapters it routes over (multi.load_bank) and route them with lora_jax.arrow")
    for k in _UNSUPPORTED:
        if cfg.get(k):
            raise ValueError(f"{path}: {k}={cfg[k]!r} is not supported (plain LoRA only)")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise ValueError(f"{path}: init_lora_weights={init!r} changes the base weights; convert the adapter "
                         "to plain LoRA with PEFT first")


def _velora(path: Path, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Our VeLoRA fields from PEFT's `velora_config` ({} without one)."""
    v = cfg.get("velora_config")
    if v is None:
        return {}
    if not isinstance(v, Mapping) or "num_groups" not in v:
        raise ValueError(f"{path}: velora_config {v!r} is not PEFT's VeloraConfig (num_groups, scale, init_type)")
    init_type = v.get("init_type", "batch_average")
    if init_type not in VELORA_INIT_TYPES:
        raise ValueError(f"{path}: velora_config init_type={init_type!r} is none of PEFT's {VELORA_INIT_TYPES}")
    return {"velora_num_groups": v["num_groups"], "velora_scale": v.get("scale", 1.0), "velora_init_type": init_type}


def _kasa(path: Path, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Our KaSA fields from PEFT's `kasa_config` ({} without one)."""
    k = cfg.get("kasa_config")
    if k is None:
        return {}
    if not isinstance(k, Mapping) or not set(k) <= {"beta", "gamma"}:
        raise ValueError(f"{path}: kasa_config {k!r} is not PEFT's KasaConfig (beta, gamma)")
    return {"use_kasa": True, "kasa_beta": k.get("beta", 1e-4), "kasa_gamma": k.get("gamma", 1e-3)}


def _weight_path(module: str, flat: Mapping[str, Any], layers_key: str) -> tuple[str, int | None]:
    """Our path for a PEFT module name, and its layer index when the base is stacked."""
    base = module.replace(".", "/")
    for leaf in tree.WEIGHT_NAMES:
        if f"{base}/{leaf}" in flat:
            return f"{base}/{leaf}", None
    split = _remove_layer(base, layers_key)
    if split is not None:
        for leaf in tree.WEIGHT_NAMES:
            if f"{split[0]}/{leaf}" in flat:
                return f"{split[0]}/{leaf}", split[1]
    raise ValueError(f"PEFT module {module!r} has no weight in the base parameters; "
                     f"closest: {tree.closest(base, list(flat))}")


def _per_output(path: Path, tensors, keys: Mapping[str, str], module: str, flag: tuple[str, bool], name: str,
                b: np.ndarray) -> np.ndarray | None:
    """DoRA's magnitude or lora_B's bias (out,), KaSA's diagonal (r,: pass lora_B transposed) of
    `module`, which the file holds exactly when the config's flag says so; None when it is off."""
    option, on = flag
    if on != (module in keys):
        raise ValueError(f"{path}: {module}: {option}={on} in the config but {'no' if on else 'a'} {name} "
                         "tensor in the file")
    if not on:
        return None
    v = np.asarray(tensors[keys[module]], np.float32)
    if v.shape != b.shape[:1]:
        raise ValueError(f"{path}: {module}: {name} {v.shape} does not match lora_B {b.shape}")
    return v


def _lora_factors(path: Path, tensors, cfg, flat, layers_key, dtype) -> dict[str, _Factors]:
    """{our path: its factors} from the PEFT tensors."""
    alpha0, rslora, dora = cfg["lora_alpha"], bool(cfg.get("use_rslora", False)), bool(cfg.get("use_dora", False))
    lora_bias, kasa = bool(cfg.get("lora_bias", False)), cfg.get("kasa_config") is not None
    diags = {mm["module"]: key for key in tensors if (mm := _DIAG_KEY.fullmatch(key.removeprefix(PREFIX)))}
    mags = {mm["module"]: key for key in tensors if (mm := _MAGNITUDE_KEY.fullmatch(key.removeprefix(PREFIX)))}
    biases = {mm["module"]: key for key in tensors if (mm := _BIAS_KEY.fullmatch(key.removeprefix(PREFIX)))}
    bd = _bdlora(path, cfg)
    groups: dict[str, dict[int | None, _Factors]] = {}
    for key, x in tensors.items():
        k = key.removeprefix(PREFIX)
        m = _LORA_KEY.fullmatch(k)
        ab = "ab" if m is not None and m["ab"] else "eab"
        if m is None or m[ab] != "A":
            continue
        module = m["module"]
        b_key = key[: len(key) - len(k)] + k[: m.start(ab)] + "B" + k[m.end(ab) :]
        if b_key not in tensors:
            raise ValueError(f"{path}: {key} has no matching lora_B tensor")
        a, b = np.asarray(x, np.float32), np.asarray(tensors[b_key], np.float32)
        if bd is not None and a.ndim == 2 and b.ndim == 2:  # BD-LoRA: the diagonal blocks alone
            a, b = _unblock(path, bd, module, a, b)
        r = a.shape[0]
        if a.ndim != 2 or b.shape[1:] != (r,):
            raise ValueError(f"{path}: {module}: lora_A {a.shape} and lora_B {b.shape} are not (r, in) / (out, r)")
        # The rank is the tensors' (rank_pattern only sized them); alpha comes from the config.
        alpha = _peft_pattern(cfg.get("alpha_pattern") or {}, module, alpha0)
        p, layer = _weight_path(module, flat, layers_key)
        if (ab == "eab") != _is_embedding(p):
            kind = "an embedding" if ab == "eab" else "a linear layer"
            raise ValueError(f"{path}: {key} is {kind}'s LoRA tensor, but {p!r} is not one")
        mag = _per_output(path, tensors, mags, module, ("use_dora", dora), "lora_magnitude_vector", b)
        bias = _per_output(path, tensors, biases, module, ("lora_bias", lora_bias), "lora_B.bias", b)
        d = _per_output(path, tensors, diags, module, ("kasa_config", kasa), "lora_diag", b.T)
        scale = alpha / (math.sqrt(r) if rslora else r)
        groups.setdefault(p, {})[layer] = _Factors(a.T, b.T, r, scale, mag, bias, d)  # [in, r], [r, out], [out], [r]
        if bd is not None:
            _check_bd_side(path, bd, module, p)
    if bd is not None:
        _check_bd_ranks(path, bd, groups)
    return _stacked(groups, flat, dtype, dora=dora, lora_bias=lora_bias, diag=kasa)


def _check_bd_side(path: Path, bd: BdLoraConfig, module: str, p: str) -> None:
    """Refuse a BD-LoRA module whose blocks our (possibly stacked) path would not keep: PEFT's
    patterns must give that path the module's side."""
    theirs = bd.side(module)
    try:
        ours = bd.side(bdlora.module_name(p))
    except ValueError:
        ours = "?"
    if ours != theirs:
        raise ValueError(f"{path}: BD-LoRA's patterns give {module!r} the block-diagonal side {theirs!r} but the "
                         f"stacked {p!r} side {ours!r}: load it into unstacked params (scan_layers=False)")


def _check_bd_ranks(path: Path, bd: BdLoraConfig, groups: Mapping[str, Mapping[int | None, _Factors]]) -> None:
    """Refuse a stack of BD-LoRA modules of several ranks: padding them to one would move their blocks."""
    for p, layers in groups.items():
        ranks = sorted({f.rank for f in layers.values()})
        if len(ranks) > 1 and bd.side(bdlora.module_name(p)) is not None:  # (_check_bd_side vetted that side)
            raise ValueError(f"{path}: BD-LoRA modules stacked into {p!r} have ranks {ranks}; padding them to one "
                             "would move their diagonal blocks: load it into unstacked params (scan_layers=False)")


def _bdlora(path: Path, cfg: Mapping[str, Any]) -> BdLoraConfig | None:
    """PEFT's `use_bdlora` as our BdLoraConfig (None without one)."""
    v = cfg.get("use_bdlora")
    if v is None:
        return None
    try:
        return BdLoraConfig(**v)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: use_bdlora {v!r} is not PEFT's BdLoraConfig: {e}") from None


def _unblock(path: Path, bd: BdLoraConfig, module: str, a: np.ndarray, b: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
    """A BD-LoRA module's (r, in/n) lora_A or (out, r/n) lora_B as the full block-diagonal (r, in) / (out, r)."""
    try:
        side = bd.side(module)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    n = bd.nblocks
    # PEFT's blocks of a (r, in) A or an (out, r) B, stacked along the rows: (r, in/n) or (out, r/n)
    if (side == "a" and a.shape[0] % n) or (side == "b" and (b.shape[0] % n or b.shape[1] * n != a.shape[0])):
        x, want = (a, "(r, in/n)") if side == "a" else (b, f"(out, r/n) with r = {a.shape[0]}")
        raise ValueError(f"{path}: {module}: BD-LoRA lora_{side.upper()} {x.shape} is not {n} diagonal blocks "
                         f"{want}: check use_bdlora's nblocks")
    return (bdlora.unblocks(a, n), b) if side == "a" else (a, bdlora.unblocks(b, n)) if side == "b" else (a, b)


def _adalora_factors(path: Path, tensors, cfg, flat, layers_key, dtype) -> dict[str, _Factors]:
    """{our path: its factors} from PEFT AdaLoRA tensors: `<module>.lora_A` (k, in), `.lora_B`
    (out, k), `.lora_E` (k, 1), the k triplets rank_pattern kept; put back at their places among
    init_r (the pruned ones zero, which adds nothing), so every module has rank init_r."""
    r0, alpha = int(cfg["init_r"]), float(cfg["lora_alpha"])
    scale = (alpha if alpha > 0 else r0) / (r0 + 1e-5)  # PEFT: scaling / (ranknum + 1e-5), ranknum = init_r
    pattern = cfg.get("rank_pattern") or {}
    groups: dict[str, dict[int | None, _Factors]] = {}
    for key in tensors:
        m = _ADALORA_KEY.fullmatch(key.removeprefix(PREFIX))
        if m is None or m["factor"] != "A":
            continue
        module = m["module"]
        a, b, e = (tensors.get(f"{PREFIX}{module}.{k}") for k in ("lora_A", "lora_B", "lora_E"))
        if b is None or e is None:
            raise ValueError(f"{path}: {key} has no matching lora_B / lora_E tensor")
        k = a.shape[0]
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != k or tuple(e.shape) != (k, 1):
            raise ValueError(f"{path}: {module}: lora_A {a.shape}, lora_B {b.shape}, lora_E {e.shape} are not "
                             "AdaLoRA's (k, in), (out, k), (k, 1)")
        keep = pattern.get(f"{module}.lora_E")
        idx = np.arange(k) if keep is None else np.flatnonzero(np.asarray(keep, bool))
        if len(idx) != k or (keep is not None and len(keep) != r0) or k > r0:
            raise ValueError(f"{path}: {module} holds {k} triplets; its rank_pattern entry keeps {len(idx)} of "
                             f"{'?' if keep is None else len(keep)} and init_r is {r0}")
        A = np.zeros((a.shape[1], r0), np.float32)  # [in, r0]
        B, E = np.zeros((r0, b.shape[0]), np.float32), np.zeros(r0, np.float32)  # [r0, out], [r0]
        A[:, idx], B[idx], E[idx] = np.asarray(a, np.float32).T, np.asarray(b, np.float32).T, np.asarray(e)[:, 0]
        p, layer = _weight_path(module, flat, layers_key)
        if _is_embedding(p):
            raise ValueError(f"{path}: {key} is an AdaLoRA tensor, but {p!r} is an embedding table")
        groups.setdefault(p, {})[layer] = _Factors(A, B, r0, scale, None, None, E)  # [in, r0], [r0, out], [r0]
    return _stacked(groups, flat, dtype, dora=False, lora_bias=False, diag=True)


def _stacked(groups: Mapping[str, Mapping[int | None, _Factors]], flat, dtype, *, dora: bool, lora_bias: bool,
             diag: bool) -> dict[str, _Factors]:
    """{our path: factors}: as they are for an unstacked base; per layer into one stack [L, ...] for
    a scanned one."""
    out = {}
    cast = lambda x: None if x is None else x.astype(dtype)  # noqa: E731
    for p, layers in groups.items():
        if None in layers:
            f = layers[None]
            out[p] = f._replace(a=f.a.astype(dtype), b=f.b.astype(dtype), m=cast(f.m), bias=cast(f.bias), d=cast(f.d))
            continue
        # A stacked base: one rank and one scale for all layers. Zero-padding the rank and
        # folding each layer's scale into its B keeps every layer's delta exact.
        n, (d_in, d_out) = flat[p].shape[0], flat[p].shape[-2:]
        r = max(v.rank for v in layers.values())
        s = layers[min(layers)].scale
        A, B = np.zeros((n, d_in, r), np.float32), np.zeros((n, r, d_out), np.float32)
        # DoRA: a layer PEFT left out keeps W0, so its magnitude is W0's column norms.
        M = np.array(column_norms(flat[p])) if dora else None  # [n, out]
        bias = np.zeros((n, d_out), np.float32) if lora_bias else None
        D = np.zeros((n, r), np.float32) if diag else None
        for i, f in layers.items():
            A[i, :, :f.rank], B[i, :f.rank, :] = f.a, f.b * (f.scale / s)  # layers PEFT left out stay zero
            if diag:
                D[i, :f.rank] = f.d
            if dora:
                M[i] = f.m
            if lora_bias:
                bias[i] = f.bias * (f.scale / s)  # s * bias_i' = s_i * bias_i, like B
        out[p] = _Factors(A.astype(dtype), B.astype(dtype), r, s, cast(M), cast(bias), cast(D))
    return out


def _extra_leaves(path: Path, tensors, flat, model_config, layers_key) -> dict[str, np.ndarray]:
    """{our path: value} for the non-LoRA tensors (biases, modules_to_save), in base dtype/layout."""
    keys = {}
    for key in tensors:
        k = key.removeprefix(PREFIX)
        if ".lora_" in k:
            if not any(r.fullmatch(k) for r in (_LORA_KEY, _MAGNITUDE_KEY, _BIAS_KEY, _DIAG_KEY)):
                raise ValueError(f"{path}: unsupported PEFT tensor {key!r} (DoRA or another LoRA variant?)")
            continue
        if ".original_module." in k or k.endswith("." + TOKEN_KEY):  # PEFT's copy of the base module; trained rows
            continue
        k = re.sub(r"\.modules_to_save(\.default)?\.", ".", k).replace(".token_adapter.base_layer.", ".")
        k = k.replace(".base_layer.", ".")
        keys[k] = key
    if not keys:
        return {}
    if model_config is None:
        raise ValueError(f"{path}: holds {len(keys)} fully trained tensors (e.g. {sorted(keys)[0]}); "
                         "pass model_config= to map them")
    out: dict[str, np.ndarray] = {}
    for k, key in sorted(keys.items()):
        mapped = hf_key_to_path(model_config, k)
        if mapped is None:
            raise ValueError(f"{path}: tensor {key!r} has no place in the model")
        parts, transpose = mapped
        value = np.asarray(tensors[key])
        value = value.T if transpose else value  # torch (out, in) -> [in, out]
        p = "/".join(parts)
        if p in flat:
            out[p] = value
            continue
        split = _remove_layer(p, layers_key)
        if split is None or split[0] not in flat:
            raise ValueError(f"{path}: tensor {key!r} maps to {p!r}, which the base parameters lack")
        stacked, i = split
        if stacked not in out:  # layers the file does not cover keep their base values
            out[stacked] = np.array(jax.device_get(flat[stacked]))
        out[stacked][i] = value
    for p, v in out.items():
        if tuple(v.shape) != tuple(flat[p].shape):
            hint = ""
            if _is_tied_head(p, model_config) and v.shape[1:] == flat[p].shape[1:]:
                hint = (f": the adapter was saved from a model with {v.shape[0]} tokens; resize the base first, "
                        f"lora_jax.models.resize_token_embeddings(model, params, {v.shape[0]})")
            raise ValueError(f"{path}: trained leaf {p!r} has shape {v.shape}, base parameter "
                             f"{tuple(flat[p].shape)}{hint}")
    return {p: jnp.asarray(v, flat[p].dtype) for p, v in out.items()}


def _without_head_copies(path: Path, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`tensors` less PEFT's `lm_head.*` copies of the tied embedding table and its trained rows
    (`save_embedding_layers` writes both); an lm_head tensor that is no such copy is refused."""
    heads = {k for k in tensors if k.removeprefix(PREFIX).startswith(HEAD)}
    if lora := sorted(k for k in heads if ".lora_" in k):
        raise ValueError(f"{path}: {lora[0]!r}: a LoRA on lm_head alone, which lora_jax's GPT-2 and BLOOM tie to "
                         "the embedding table (a LoRA on the table acts in both)")
    for k in heads:
        suffix = k.removeprefix(PREFIX)[len(HEAD):]  # weight, base_layer.weight, token_adapter.<...>
        twins = [c for c in tensors if c not in heads and c.endswith("." + suffix)
                 and tensors[c].shape == tensors[k].shape and np.array_equal(tensors[c], tensors[k])]
        if not twins:
            raise ValueError(f"{path}: {k!r} {tuple(tensors[k].shape)} is not a copy of the embedding table "
                             "(lora_jax's GPT-2 and BLOOM tie the LM head to it; untied heads are not supported)")
    return {k: v for k, v in tensors.items() if k not in heads}


def _token_tensors(path: Path, tensors, cfg, flat, layers_key,
                   dtype) -> dict[str, tuple[tuple[int, ...], np.ndarray]]:
    """{our table path: (token ids, trained rows [n, D])} from PEFT's trainable_tokens tensors."""
    found = {}
    for key, x in tensors.items():
        k = key.removeprefix(PREFIX)
        if k.endswith("." + TOKEN_KEY):
            found[k[: -len(TOKEN_KEY) - 1]] = (key, x)
    spec = cfg.get("trainable_token_indices")
    if not found and not spec:
        return {}
    if not found or not spec:
        raise ValueError(f"{path}: trainable_token_indices={spec!r} in the config but "
                         f"{len(found)} {TOKEN_KEY} tensors in the file")
    out = {}
    for module, (key, x) in found.items():
        if isinstance(spec, Mapping):
            names = [n for n in spec if module == n or module.endswith("." + n)]
            if len(names) != 1:
                raise ValueError(f"{path}: {key} matches {names} of trainable_token_indices {sorted(spec)}")
            ids = spec[names[0]]
        elif len(found) == 1:
            ids = spec
        else:
            raise ValueError(f"{path}: one trainable_token_indices list for {len(found)} tables {sorted(found)}")
        p, layer = _weight_path(module, flat, layers_key)
        rows = np.asarray(x, np.float32)
        if layer is not None or not _is_embedding(p) or rows.shape != (len(ids), flat[p].shape[-1]):
            raise ValueError(f"{path}: {key} {rows.shape} is not {len(ids)} rows of an embedding table; "
                             f"{p!r} is {tuple(flat[p].shape)}")
        out[p] = (tuple(int(i) for i in ids), rows.astype(dtype))
    return out


def _our_module(name: str, flat: Mapping[str, Any], layers_key: str) -> str:
    """A PEFT module name as our name pattern; `h.1.mlp` becomes `h/mlp` on a stacked base."""
    p = name.replace(".", "/")
    split = _remove_layer(p, layers_key)
    if tree.select((p,), flat) or split is None:
        return p
    return split[0]


def _our_targets(cfg, paths: list[str], params, config_kw, layers_key) -> Any:
    """PEFT target_modules as our names when they select exactly `paths`, else the module paths."""
    tm = cfg.get("target_modules")
    if isinstance(tm, (list, tuple)) and tm:
        names = tuple(t.replace(".", "/") for t in tm)
        try:
            if sorted(target_paths(LoraConfig(targets=names, **config_kw), params)) == sorted(paths):
                return names
        except ValueError:
            pass
    return tuple(sorted(p.rsplit("/", 1)[0] for p in paths))


def _keeps_layers(config: LoraConfig, modules: set[str], flat, layers_key) -> bool:
    """Whether `config`'s layers_to_transform keeps every layer of the PEFT `modules` the file adapts."""
    for module in modules:
        p, i = _weight_path(module, flat, layers_key)
        gate = layer_gate(config, p, flat[p].shape)
        if gate is not None and not (gate.all() if i is None else gate[i]):
            return False
    return True


def load_peft(directory: str | os.PathLike, params: PyTree, *, model_config: BaseConfig | None = None,
              dtype: Any = jnp.float32, layers_key: str = LAYERS_KEY, revision: str | None = None) -> PeftAdapter:
    """Read a PEFT LoRA (or AdaLoRA) adapter directory into our config, adapters and trained leaves.

    Args:
      directory: holds `adapter_config.json` and `adapter_model.safetensors` (or `.bin`); or a
        hub id of such a repo (downloaded, or read from the Hugging Face cache offline).
      params: the base parameters (unrolled or scanned); adapters are laid out to fit them.
      model_config: needed when the adapter holds fully trained tensors (biases, modules).
      dtype: dtype of the returned LoRA factors.
      revision: of the adapter's hub id: a branch, tag or commit hash (as `PeftModel.from_pretrained(...,
        revision=)`); default `main`.
    Returns:
      PeftAdapter(config, adapters, extras, base_model_name_or_path, base_model_revision); put the
      extras into the params with `checkpoint.update_params(params, extras)`.
    """
    directory = resolve_pretrained_dir(directory, revision)
    cfg_path = directory / CONFIG_FILE
    cfg = read_json(cfg_path, "PEFT adapter config")
    _check_supported(cfg_path, cfg)
    kasa = _kasa(cfg_path, cfg)
    for k in ("r", "lora_alpha"):
        if k not in cfg:
            raise ValueError(f"{cfg_path}: missing {k!r}")
    weights = directory / WEIGHTS_FILE
    if not weights.is_file() and (directory / BIN_FILE).is_file():
        weights = directory / BIN_FILE  # an old PEFT save: torch pickle, read with weights_only=True
    tensors = _without_head_copies(weights, read_tensors(weights))
    if cfg.get("monteclora_config"):
        sampler = {k for k in tensors if SAMPLER in k}
        tensors = {k: v for k, v in tensors.items() if k not in sampler}
        modules = len({k.split(SAMPLER)[0] for k in sampler})
        warnings.warn(f"{cfg_path}: a MonteCLoRA adapter: its sampler ({len(sampler)} tensors over {modules} "
                      "modules) perturbs lora_A in training only, so it is loaded as the plain LoRA it is at "
                      "inference and in PEFT's merge; lora_jax does not train that sampler, and re-exports plain "
                      "LoRA", stacklevel=2)
    velora_kw = _velora(cfg_path, cfg)
    bd = _bdlora(cfg_path, cfg)
    # PEFT's projection buffer per module: kept for a fixed init_type, else recomputed from every batch here
    found = {k: m["module"] for k in tensors if (m := _EMBED_KEY.fullmatch(k.removeprefix(PREFIX)))}
    embeds = {module: tensors[k] for k, module in found.items()}
    tensors = {k: v for k, v in tensors.items() if k not in found}
    flat = tree.flatten(params)
    ada = cfg.get("peft_type") == ADALORA
    factors = (_adalora_factors if ada else _lora_factors)(weights, tensors, cfg, flat, layers_key, np.dtype(dtype))
    if not factors:
        raise ValueError(f"{weights}: no lora_A / lora_B tensors")
    rest = {k: v for k, v in tensors.items() if not (ada and _ADALORA_KEY.fullmatch(k.removeprefix(PREFIX)))}
    extras = _extra_leaves(weights, rest, flat, model_config, layers_key)
    tied = [p for p in factors if _is_embedding(p) and (model_config is None or _is_tied_head(p, model_config))]
    if tied:  # whatever ensure_weight_tying says (PEFT honours it for embed_tokens / lm_head alone)
        warnings.warn(f"{cfg_path}: {_TIED_LOOKUP_ONLY.format(tied[0])}", stacklevel=2)

    rank, alpha = int(cfg["init_r" if ada else "r"]), float(cfg["lora_alpha"])
    rslora = bool(cfg.get("use_rslora", False))
    alpha_of = lambda r, s: s * (math.sqrt(r) if rslora else r)
    # (AdaLoRA: every module at init_r with one scale, so neither pattern.)
    rank_pattern = {} if ada else {re.escape(p.rsplit("/", 1)[0]): f.rank for p, f in factors.items() if f.rank != rank}
    alpha_pattern = {} if ada else {re.escape(p.rsplit("/", 1)[0]): alpha_of(f.rank, f.scale)
                                    for p, f in factors.items()
                                    if not math.isclose(alpha_of(f.rank, f.scale), alpha, rel_tol=1e-12)}
    init = cfg.get("init_lora_weights", True)
    bias = cfg.get("bias", "none")
    trainable = tuple(sorted({_our_module(m, flat, layers_key) for m in cfg.get("modules_to_save") or []})) or None
    table = None if model_config is None else f"transformer/{model_config.embed_name}/{tree.EMBEDDING_NAME}"
    if trainable and table in flat and tree.select(trainable, [table]):
        raise ValueError(f"{cfg_path}: modules_to_save {cfg['modules_to_save']} trains the embedding table "
                         f"{_module(table)!r} in full: PEFT gives its copy to the lookup alone, the LM head keeping "
                         "the original table, which lora_jax's tied GPT-2 and BLOOM cannot hold")
    kw = dict(rank=rank, alpha=alpha, dropout=float(cfg.get("lora_dropout", 0.0)), use_rslora=rslora,
              use_dora=bool(cfg.get("use_dora", False)), lora_bias=bool(cfg.get("lora_bias", False)),
              init=init if not ada and init in (("gaussian",) if kasa or bd else
                                                ("gaussian", "orthogonal", "eva", "mica")) else "kaiming_uniform",
              use_bdlora=bd,
              rank_pattern=rank_pattern,
              alpha_pattern=alpha_pattern, bias=bias, trainable=trainable,
              layers_to_transform=None if cfg.get("layers_to_transform") == [] else cfg.get("layers_to_transform"),
              layers_pattern=cfg.get("layers_pattern") or None,
              alora_invocation_tokens=cfg.get("alora_invocation_tokens"),
              **velora_kw,
              **kasa, **({"adalora": AdaLoraSchedule(**{k: cfg[k] for k in _SCHEDULE if cfg.get(k) is not None})}
                         if ada else {}))
    # PEFT applies layers_to_transform to suffix matches alone (a module target_modules names in full
    # is adapted whatever its layer; an empty list means every layer): where ours would drop a layer
    # the file adapts, the file's modules decide.
    key_re = _ADALORA_KEY if ada else _LORA_KEY
    held = {m["module"] for k in tensors if (m := key_re.fullmatch(k.removeprefix(PREFIX)))}
    if kw["layers_to_transform"] is not None and not _keeps_layers(
            LoraConfig(targets=tuple(sorted(p.rsplit("/", 1)[0] for p in factors)), **kw), held, flat, layers_key):
        kw |= dict(layers_to_transform=None, layers_pattern=None)
    tokens = _token_tensors(weights, tensors, cfg, flat, layers_key, np.dtype(dtype))
    config = LoraConfig(targets=_our_targets(cfg, list(factors), params, kw, layers_key), **kw,
                        trainable_tokens={p.rsplit("/", 1)[0]: ids for p, (ids, _) in tokens.items()} or None)
    adapters = {p: {"lora_A": jnp.asarray(f.a), "lora_B": jnp.asarray(f.b)}
                | ({} if f.m is None else {MAGNITUDE: jnp.asarray(f.m)})
                | ({} if f.bias is None else {LORA_BIAS: jnp.asarray(f.bias)})
                | ({} if f.d is None else {ADALORA_E if ada else KASA_DIAG: jnp.asarray(f.d)})
                for p, f in factors.items()}
    adapters |= {p: {TOKENS: jnp.asarray(rows)} for p, (_, rows) in tokens.items()}
    if velora_fixed(config):
        for p in factors:
            key = _module(p) if _stack_dim(p, layers_key) is None else None
            if key not in embeds:
                raise ValueError(f"{weights}: VeLoRA's {config.velora_init_type} projection for {p!r} is "
                                 + ("missing (lora_velora_embed)" if key else "per layer; VeLoRA takes unstacked "
                                    "params (scan_layers=False)"))
            adapters[p][velora.EMBED] = jnp.asarray(embeds[key], dtype)
    check_adapters(config, params, adapters)
    for p, f in factors.items():  # the config we built must reproduce PEFT's ranks and scales
        assert config.rank_for(p) == f.rank and math.isclose(config.scale_for(p), f.scale, rel_tol=1e-9), p
    if config.use_kasa:
        warnings.warn(f"{cfg_path}: {BASE_WARNING}", stacklevel=2)
    return PeftAdapter(config, adapters, extras, cfg.get("base_model_name_or_path"), cfg.get("revision"))


def load_adapter(directory: str | os.PathLike, params: PyTree, *, model_config: BaseConfig | None = None,
                 revision: str | None = None) -> PeftAdapter | AdapterCheckpoint:
    """A lora_jax adapter checkpoint or a PEFT adapter directory (or hub id, at `revision`), told
    apart by their files.

    Both results have `config`, `adapters` and `extras` (fully trained leaves, often empty).
    """
    d = resolve_pretrained_dir(directory, revision)
    if (d / MANIFEST).is_file():
        return checkpoint_load(d, params)
    if (d / CONFIG_FILE).is_file():
        return load_peft(d, params, model_config=model_config)
    raise FileNotFoundError(f"{d}: neither a lora_jax adapter ({MANIFEST}) nor a PEFT adapter ({CONFIG_FILE})")


# ----------------------------------------------------------------------------- merged export


def save_merged(directory: str | os.PathLike, model_config: BaseConfig, params: PyTree, config: LoraConfig,
                adapters: Adapters, *, dtype: Any = None, tokenizer: Any = None,
                overwrite: bool = False) -> Path:
    """Fold the adapters into the base and write a Hugging Face checkpoint transformers loads.

    Args:
      directory: written atomically (`config.json`, `model.safetensors`, the tokenizer if given).
      model_config: the base model's config; params: the (trained) params, scanned or unrolled.
      dtype: storage dtype of the weights (default: the params' dtype).
      tokenizer: anything with `save_pretrained(dir)`, saved alongside.
    """
    # merge() donates its params argument: hand it a copy so the caller's params stay valid.
    # NF4 weights are written dequantized, adapted or not.
    merged = merge(config, tree.map_with_path(lambda _, x: jnp.array(dense(x)), params), adapters)
    return save_checkpoint(directory, model_config, merged, dtype=dtype, tokenizer=tokenizer, overwrite=overwrite)


def save_checkpoint(directory: str | os.PathLike, model_config: BaseConfig, params: PyTree, *, dtype: Any = None,
                    tokenizer: Any = None, overwrite: bool = False) -> Path:
    """`params` as a Hugging Face checkpoint transformers loads (NF4 weights dequantized), written
    atomically, with the tokenizer if given (anything with `save_pretrained(dir)`)."""
    dense_params = tree.map_with_path(lambda _, x: dense(x), params)
    if dtype is not None:
        dense_params = jax.tree.map(lambda x: x.astype(_np_dtype(dtype)), dense_params)
    state = params_to_hf_state_dict(model_config, dense_params)
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        write_hf_files(tmp, model_config, state)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(directory).expanduser()
