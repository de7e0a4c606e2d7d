"""Hugging Face checkpoints <-> our param trees.

    model, params = from_pretrained("gpt2")                     # hub id (HF cache) or local dir
    clf, params = classifier_from_pretrained("gpt2", num_labels=3)   # + a `score` head (new or loaded)
    qa, params = question_answering_from_pretrained("gpt2")           # + `qa_outputs` (new or loaded)
    tagger, params = token_classifier_from_pretrained("gpt2", num_labels=9)   # + `classifier`
    tok = load_tokenizer("gpt2")
    state = params_to_hf_state_dict(model.config, params)      # HF names, HF orientation
    save_hf_checkpoint("out/", model.config, params)           # config.json + model.safetensors

Loading is one pure key map (`hf_key_to_path`), one explicit transpose rule (torch `Linear`
weights are (out, in): BLOOM; GPT-2's `Conv1D` weights are already (in, out)), and checks that
fail with a ValueError listing missing tensors, unexpected tensors and wrong shapes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.models.bloom import BloomConfig
from lora_jax.models.common import (SCORE, BaseConfig, CausalLM, Params, SequenceClassifier, stack_layers,
                                    unstack_layers)
from lora_jax.models.gpt2 import GPT2Config
from lora_jax.models.heads import CLASSIFIER, QA_OUTPUTS, QuestionAnswering, TokenClassifier
from lora_jax.quant import QuantizedArray, from_bnb, is_bnb

CONFIG_CLASSES: dict[str, type[BaseConfig]] = {"gpt2": GPT2Config, "bloom": BloomConfig}
# Task heads on the decoder: torch Linears (weight (out, in)) at the top level, named as transformers names them.
HEADS = {SCORE: "a sequence classifier", QA_OUTPUTS: "a question-answering model", CLASSIFIER: "a token classifier"}
_HEAD_LOADERS = {SCORE: "classifier_from_pretrained", QA_OUTPUTS: "question_answering_from_pretrained",
                 CLASSIFIER: "token_classifier_from_pretrained"}
Model = CausalLM | SequenceClassifier | QuestionAnswering | TokenClassifier

# What a snapshot download needs: config, weights (single or sharded), tokenizer files.
_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.txt", "*.model"]
_SAFE_INDEX, _BIN_INDEX = "model.safetensors.index.json", "pytorch_model.bin.index.json"


# ----------------------------------------------------------------------------- resolution


def _hub_cache_dir() -> Path:
    # Read the environment at call time: huggingface_hub freezes its constants at import.
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _cached_snapshot(cache_dir: Path, repo_id: str, revision: str | None = None) -> Path | None:
    """`models--org--name/snapshots/<commit>/` of `revision`: a branch or tag through `refs/<revision>`,
    or a commit hash naming the snapshot itself. Without a revision: `refs/main`, else the newest
    snapshot. None when the cache holds no such snapshot."""
    repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
    ref = repo / "refs" / (revision or "main")
    if ref.is_file():
        snap = repo / "snapshots" / ref.read_text().strip()
        if snap.is_dir():
            return snap
    if revision is not None:
        snap = repo / "snapshots" / revision
        return snap if revision and "/" not in revision and snap.is_dir() else None
    snaps = sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime)
    return snaps[-1] if snaps else None


def resolve_pretrained_dir(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """A local checkpoint directory, or a hub id resolved through the Hugging Face cache.

    Downloads (config, weights, tokenizer files) when online; offline (HF_HUB_OFFLINE=1, or no
    network) it uses an existing `HF_HUB_CACHE/models--org--name/snapshots/<rev>/`. `revision`
    (a branch, tag or commit hash, as transformers' `revision=`) picks the hub snapshot; a local
    directory has none, so naming one for it is an error.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"revision={revision!r} names a hub revision, but {str(name_or_path)!r} is a local "
                             "directory")
        return path
    repo_id, cache_dir = str(name_or_path), _hub_cache_dir()
    at = "" if revision is None else f" at revision {revision!r}"
    error: Exception | None = None
    try:
        from huggingface_hub import snapshot_download

        fetch = lambda patterns: Path(snapshot_download(  # noqa: E731
            repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns, local_files_only=_offline()))
        # Safetensors first; pickled .bin weights only for repos that have nothing else.
        snap = fetch([p for p in _ALLOW_PATTERNS if p != "*.bin"])
        return snap if any(snap.glob("*.safetensors")) else fetch(_ALLOW_PATTERNS)
    except Exception as e:  # no network, missing refs, or huggingface_hub not installed
        error = e
    snap = _cached_snapshot(cache_dir, repo_id, revision)
    if snap is None:
        raise FileNotFoundError(
            f"{str(name_or_path)!r}{at} is neither a directory nor a hub id found in the cache "
            f"{cache_dir} (download failed: {error})"
        )
    return snap


# ----------------------------------------------------------------------------- config


AUTO_DTYPES = ("float32", "bfloat16", "float16")


def auto_dtype(hf: Mapping[str, Any], state: Mapping[str, Any] | None = None) -> jnp.dtype:
    """transformers' `dtype="auto"`: the config's `dtype` (older files: `torch_dtype`), else the
    dtype of the checkpoint's first floating-point tensor (when `state` is given), else float32."""
    for k in ("dtype", "torch_dtype"):
        name = hf.get(k)
        if name is not None:
            name = str(name).removeprefix("torch.")
            if name not in AUTO_DTYPES:
                raise ValueError(f"config {k}={hf[k]!r}: dtype='auto' takes one of {list(AUTO_DTYPES)}")
            return jnp.dtype(name)
    for v in (state or {}).values():
        if not isinstance(v, QuantizedArray) and str(v.dtype) in AUTO_DTYPES:
            return jnp.dtype(v.dtype)
    return jnp.dtype(jnp.float32)


def _auto(overrides: Mapping[str, Any]) -> bool:
    """Whether `param_dtype="auto"` was asked for (a dtype object is never compared to a string)."""
    return isinstance(overrides.get("param_dtype"), str) and overrides["param_dtype"] == "auto"


def load_config(path_or_dict: str | os.PathLike | Mapping[str, Any], *, revision: str | None = None,
                **overrides: Any) -> BaseConfig:
    """Config from a `config.json` dict, a file, a checkpoint directory or a hub id (at `revision`).

    Dispatches on `model_type` ("gpt2", "bloom"); anything else raises ValueError.
    `param_dtype="auto"` takes the config's `dtype` (float32 when it names none).
    """
    if isinstance(path_or_dict, Mapping):
        hf = dict(path_or_dict)
    else:
        path = Path(path_or_dict).expanduser()
        if not path.is_file() or revision is not None:
            directory = resolve_pretrained_dir(path_or_dict, revision)
            path = directory / "config.json"
            if not path.is_file():
                raise FileNotFoundError(f"{directory}: no config.json there (not a Hugging Face checkpoint directory)")
        hf = json.loads(path.read_text())
    model_type = hf.get("model_type")
    if model_type not in CONFIG_CLASSES:
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported: {sorted(CONFIG_CLASSES)}"
        )
    if _auto(overrides):
        overrides["param_dtype"] = auto_dtype(hf)
    return CONFIG_CLASSES[model_type].from_hf(hf, **overrides)


# ----------------------------------------------------------------------------- key map


def hf_key_to_path(config: BaseConfig, key: str) -> tuple[tuple[str, ...], bool] | None:
    """Map one HF tensor name to (our unrolled param path, transpose?), or None if ignored.

    `h.0.attn.c_attn.weight` and `transformer.h.0.attn.c_attn.weight` both map to
    `("transformer", "h", "0", "attn", "c_attn", "kernel")`. Unknown names still map to a path;
    the caller reports it as unexpected because no such param exists.
    """
    if re.fullmatch(config.hf_ignored_keys, key):
        return None
    head, _, leaf = key.partition(".")
    if head in HEADS and leaf in ("weight", "bias"):  # a task head: a torch Linear in every architecture
        return (head, "kernel" if leaf == "weight" else "bias"), leaf == "weight"
    parts = key.removeprefix("transformer.").split(".")
    *module, leaf = parts
    owner = module[-1] if module else ""
    transpose = False
    if owner in config.embedding_modules and leaf == "weight":
        leaf = "embedding"
    elif owner in config.layernorm_modules and leaf == "weight":
        leaf = "scale"
    elif owner in config.linear_modules and leaf == "weight":
        leaf, transpose = "kernel", config.hf_transpose_linear
    return ("transformer", *module, leaf), transpose


def path_to_hf_key(config: BaseConfig, path: tuple[str, ...]) -> tuple[str, bool]:
    """Inverse of `hf_key_to_path` for an unrolled path: (HF name, transpose?)."""
    *module, leaf = path
    transpose = leaf == "kernel" and (config.hf_transpose_linear or (len(module) == 1 and module[0] in HEADS))
    leaf = {"embedding": "weight", "scale": "weight", "kernel": "weight"}.get(leaf, leaf)
    return ".".join([*module, leaf]), transpose


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, (*prefix, k)))
        else:
            out[(*prefix, k)] = v
    return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> Params:
    out: Params = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


def convert_hf_state_dict(config: BaseConfig, state: Mapping[str, np.ndarray], *,
                          num_labels: int | None = None, model: Model | None = None) -> Params:
    """HF tensors (numpy) -> unrolled param tree in `config.param_dtype`, fully checked; with
    `num_labels`, a sequence classifier's (`score.weight` included); with `model`, that model's (a
    `QuestionAnswering` / `TokenClassifier` with its head).

    Raises ValueError naming every missing tensor, unexpected tensor and wrong shape. Tensors
    saved from a bitsandbytes 4- or 8-bit model become `quant.QuantizedArray`s (`quant.from_bnb`).
    """
    if is_bnb(state):
        state = from_bnb(state)
    body = config.replace(scan_layers=False)
    if model is not None:
        model = dataclasses.replace(model, config=body)
    else:
        model = CausalLM(body) if num_labels is None else SequenceClassifier(body, num_labels)
    expected = _flatten(model.param_shapes())
    found: dict[tuple[str, ...], tuple[str, np.ndarray, bool]] = {}
    unexpected, bad_shape = [], []
    for key, value in state.items():
        mapped = hf_key_to_path(config, key)
        if mapped is None:
            continue
        path, transpose = mapped
        if path not in expected or path in found:
            unexpected.append(key)
            continue
        if isinstance(value, QuantizedArray):  # already [in, out] (bitsandbytes keeps torch's order inside)
            transpose = False
        else:
            value = np.asarray(value)
        shape = value.shape[::-1] if transpose else value.shape
        if shape != expected[path].shape:
            want = expected[path].shape[::-1] if transpose else expected[path].shape
            bad_shape.append(f"{key}: got {value.shape}, expected {want}")
            continue
        found[path] = (key, value, transpose)
    missing = [path_to_hf_key(config, p)[0] for p in expected if p not in found]
    head = state.get("lm_head.weight")
    if head is not None and (emb := found.get(("transformer", config.embed_name, "embedding"))):
        if not np.array_equal(np.asarray(head), emb[1]):
            unexpected.append("lm_head.weight (differs from the tied embedding)")
    if missing or unexpected or bad_shape:
        lines = [f"checkpoint does not match the {config.model_type} config:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad_shape)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(sorted(items)))
        raise ValueError("\n".join(lines))
    dtype = config.param_dtype
    return _unflatten(
        {p: v.astype(dtype) if isinstance(v, QuantizedArray) else jnp.asarray(v.T if t else v, dtype=dtype)
         for p, (_, v, t) in found.items()}
    )


def params_to_hf_state_dict(config: BaseConfig, params: Params) -> dict[str, np.ndarray]:
    """Param tree (scanned or unrolled) -> HF state dict (`transformer.`-prefixed names, torch
    orientation, param dtype). The tied LM head is left out, as `save_pretrained` does."""
    flat = _flatten(unstack_layers(params))
    out = {}
    for path, value in flat.items():
        key, transpose = path_to_hf_key(config, path)
        value = np.asarray(jax.device_get(value))
        out[key] = np.ascontiguousarray(value.T if transpose else value)
    return out


# ----------------------------------------------------------------------------- files


def load_hf_state_dict(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory: safetensors (single or sharded) preferred, else
    `pytorch_model*.bin` via `torch.load(weights_only=True)` (needs torch).

    A single file wins over a shard index, as in transformers: saving unsharded into a directory
    that held a sharded checkpoint leaves the old index behind (and, from us, its shards)."""
    directory = Path(directory).expanduser()
    files: list[Path]
    if (directory / "model.safetensors").is_file():
        files = [directory / "model.safetensors"]
    elif (directory / _SAFE_INDEX).is_file():
        index = json.loads((directory / _SAFE_INDEX).read_text())
        files = [directory / f for f in sorted(set(index["weight_map"].values()))]
    elif (directory / "pytorch_model.bin").is_file():
        files = [directory / "pytorch_model.bin"]
    elif (directory / _BIN_INDEX).is_file():
        index = json.loads((directory / _BIN_INDEX).read_text())
        files = [directory / f for f in sorted(set(index["weight_map"].values()))]
    else:
        raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {directory}")
    state: dict[str, np.ndarray] = {}
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"checkpoint shard listed in the index is missing: {f}")
        state.update(read_tensors(f))
    return state


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of one `.safetensors` file, or of a torch `.bin` read with `weights_only=True`.

    A truncated or corrupted file raises one ValueError naming it; nothing partial is returned.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.numpy import load_file

            return dict(load_file(path))
        return _load_torch_bin(path)
    except ImportError:
        raise
    except Exception as e:  # safetensors / torch raise their own types for damaged files
        if "Weights only load failed" in str(e):  # intact, but not plain tensors: nothing of it was run
            raise ValueError(f"{path}: refused: the pickle holds objects other than tensors, which "
                             "torch.load(weights_only=True) does not unpickle") from None
        raise ValueError(f"{path}: could not read the checkpoint (truncated or corrupted?): "
                         f"{type(e).__name__}: {e}") from None


def _load_torch_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"{path.name} needs torch to read; install torch or use safetensors") from e
    import ml_dtypes

    # weights_only=True: never unpickle arbitrary objects from a downloaded file.
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"expected a dict of tensors, got {type(state).__name__}")
    out = {}
    for k, t in state.items():
        if t.dtype == torch.bfloat16:  # numpy has no bf16; reinterpret the bits
            out[k] = t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            out[k] = t.numpy()
    return out


def from_pretrained(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    dtype: Any = jnp.float32,
    scan_layers: bool = False,
    remat: bool = False,
    compute_dtype: Any = None,
    remat_policy: str | None = None,
    attention_impl: str = "auto",
) -> tuple[CausalLM, Params]:
    """Load a GPT-2 / BLOOM checkpoint (local directory or hub id) as `(model, params)`.

    Args:
      revision: the hub revision (branch, tag or commit hash) of a hub id; default its `main`.
      dtype: parameter storage dtype (float32 or bfloat16; float32 by default, for training), or
        "auto" (transformers' default): the config's `dtype`, else the checkpoint's.
      scan_layers: stack layers to [L, ...] and run them with `lax.scan` (fast compile).
      remat: rematerialise each layer in the backward pass, with `remat_policy`.
      compute_dtype: activation dtype (default: `dtype`); bfloat16 on GPU picks cuDNN attention.

    A checkpoint saved from a bitsandbytes 4-bit (NF4) or 8-bit model loads with its linear
    weights as `quant.QuantizedArray`s, the bytes unchanged: run it through `lj.apply` or
    `quant.apply`.
    """
    config, state = _read_checkpoint(name_or_path, revision, param_dtype=dtype, compute_dtype=compute_dtype,
                                     scan_layers=scan_layers, remat=remat, remat_policy=remat_policy,
                                     attention_impl=attention_impl)
    for head, what in HEADS.items():
        if f"{head}.weight" in state:
            raise ValueError(f"{name_or_path} is {what} (it has {head}.weight): load it with {_HEAD_LOADERS[head]}")
    params = convert_hf_state_dict(config, state)
    return CausalLM(config), stack_layers(params) if scan_layers else params


def _read_checkpoint(name_or_path: str | os.PathLike, revision: str | None = None,
                     **overrides: Any) -> tuple[BaseConfig, dict[str, Any]]:
    directory = resolve_pretrained_dir(name_or_path, revision)
    config = load_config(directory, **overrides)
    state = load_hf_state_dict(directory)
    if _auto(overrides):
        config = config.replace(param_dtype=auto_dtype(config.hf_config, state))  # the tensors', if config names none
    if is_bnb(state):  # saved by transformers from a bitsandbytes 4- or 8-bit model
        state = from_bnb(state)
    return config, state


def classifier_from_pretrained(
    name_or_path: str | os.PathLike,
    *,
    num_labels: int | None = None,
    key: jax.Array | None = None,
    revision: str | None = None,
    dtype: Any = jnp.float32,
    scan_layers: bool = False,
    remat: bool = False,
    compute_dtype: Any = None,
    remat_policy: str | None = None,
    attention_impl: str = "auto",
) -> tuple[SequenceClassifier, Params]:
    """A GPT-2 / BLOOM sequence classifier, as `AutoModelForSequenceClassification.from_pretrained`.

    A checkpoint with a `score.weight` (saved from `*ForSequenceClassification`) loads it, and
    `num_labels` (if given) must match it; any other checkpoint gets a new head of `num_labels`
    classes (default: the config's `id2label` count, else 2) drawn with `key` (default key 0).
    The other arguments are `from_pretrained`'s.
    """
    return _with_head(name_or_path, SCORE, lambda config, n: SequenceClassifier(config, n), num_labels, key,
                      revision=revision, param_dtype=dtype, compute_dtype=compute_dtype, scan_layers=scan_layers,
                      remat=remat, remat_policy=remat_policy, attention_impl=attention_impl)


def question_answering_from_pretrained(
    name_or_path: str | os.PathLike,
    *,
    key: jax.Array | None = None,
    revision: str | None = None,
    dtype: Any = jnp.float32,
    scan_layers: bool = False,
    remat: bool = False,
    compute_dtype: Any = None,
    remat_policy: str | None = None,
    attention_impl: str = "auto",
) -> tuple[QuestionAnswering, Params]:
    """A GPT-2 / BLOOM extractive-QA model, as `AutoModelForQuestionAnswering.from_pretrained`: a
    checkpoint saved from `*ForQuestionAnswering` loads its `qa_outputs`, any other gets a new one
    drawn with `key` (default key 0). The other arguments are `from_pretrained`'s."""
    return _with_head(name_or_path, QA_OUTPUTS, lambda config, _: QuestionAnswering(config), 2, key,
                      revision=revision, param_dtype=dtype, compute_dtype=compute_dtype, scan_layers=scan_layers,
                      remat=remat, remat_policy=remat_policy, attention_impl=attention_impl)


def token_classifier_from_pretrained(
    name_or_path: str | os.PathLike,
    *,
    num_labels: int | None = None,
    key: jax.Array | None = None,
    revision: str | None = None,
    dtype: Any = jnp.float32,
    scan_layers: bool = False,
    remat: bool = False,
    compute_dtype: Any = None,
    remat_policy: str | None = None,
    attention_impl: str = "auto",
) -> tuple[TokenClassifier, Params]:
    """A GPT-2 / BLOOM token classifier, as `AutoModelForTokenClassification.from_pretrained`: a
    checkpoint saved from `*ForTokenClassification` loads its `classifier` (`num_labels`, if given,
    must match it), any other gets a new one of `num_labels` (default: the config's `id2label`
    count, else 2) drawn with `key` (default key 0). The other arguments are `from_pretrained`'s."""
    return _with_head(name_or_path, CLASSIFIER, lambda config, n: TokenClassifier(config, n), num_labels, key,
                      revision=revision, param_dtype=dtype, compute_dtype=compute_dtype, scan_layers=scan_layers,
                      remat=remat, remat_policy=remat_policy, attention_impl=attention_impl)


def _with_head(name_or_path, head: str, make, num_outputs: int | None, key: jax.Array | None, *,
               revision: str | None, **overrides):
    """(model, params) of `make(config, outputs)`, whose params hold the decoder and the task head
    `head`: the checkpoint's own (its rows must be `num_outputs`, if given), or a new one."""
    config, state = _read_checkpoint(name_or_path, revision, **overrides)
    weight = state.get(f"{head}.weight")
    if isinstance(weight, QuantizedArray):
        raise ValueError(f"{name_or_path}: {head}.weight is stored in {weight.scheme}; only a full-precision head "
                         "loads")
    for other, what in HEADS.items():
        if other != head and f"{other}.weight" in state:
            raise ValueError(f"{name_or_path} is {what} (it has {other}.weight): load it with {_HEAD_LOADERS[other]}")
    if weight is not None:  # (outputs, hidden), torch orientation
        if num_outputs is not None and num_outputs != weight.shape[0]:
            raise ValueError(f"{name_or_path}: {head}.weight {tuple(weight.shape)} holds {weight.shape[0]} labels, "
                             f"not num_labels={num_outputs}")
        model = make(config, int(weight.shape[0]))
        params = convert_hf_state_dict(config, state, model=model)
    else:
        model = make(config, num_outputs or len(config.hf_config.get("id2label") or {}) or 2)
        params = convert_hf_state_dict(config, state)
        params |= model.init_head(jax.random.key(0) if key is None else key)
    return model, stack_layers(params) if overrides["scan_layers"] else params


def save_hf_checkpoint(directory: str | os.PathLike, config: BaseConfig, params: Params) -> Path:
    """Write `config.json` + `model.safetensors` that transformers `from_pretrained` loads.
    `~` is expanded, as the loaders do: `from_pretrained("~/x")` reads what `"~/x"` wrote."""
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    write_hf_files(directory, config, params_to_hf_state_dict(config, params))
    return directory


def write_hf_files(directory: Path, config: BaseConfig, state: Mapping[str, np.ndarray]) -> None:
    """`model.safetensors` from an HF state dict and the `config.json` naming its dtype."""
    from safetensors.numpy import save_file

    hf = config.to_hf()
    head = next((h for h in HEADS if f"{h}.weight" in state), None)
    if head is not None:  # a task head: its architecture, and for classifiers one label name per class
        hf["architectures"] = [config.hf_head_architectures[head]]
        labels = state[f"{head}.weight"].shape[0]
        if head != QA_OUTPUTS and len(hf.get("id2label") or {}) != labels:
            hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(labels)}
            hf["label2id"] = {f"LABEL_{i}": i for i in range(labels)}
    # transformers loads in the config's dtype: name the tensors actually stored.
    stored = str(np.dtype(next(iter(state.values())).dtype))
    for k in ("dtype", "torch_dtype"):
        if k in hf:
            hf[k] = stored
    save_file(dict(state), directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))


def load_tokenizer(name_or_path: str | os.PathLike, revision: str | None = None):
    """The checkpoint's tokenizer through `transformers.AutoTokenizer` (same resolution, `revision` too)."""
    from transformers import AutoTokenizer

    directory = resolve_pretrained_dir(name_or_path, revision)
    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as e:  # transformers' messages do not say where it looked
        raise ValueError(f"{directory}: no tokenizer could be loaded from there ({e})") from e
