"""Adapter-only checkpoints with orbax: the adapters, the LoRA config and the base model's name.

    save("ckpt/step100", config, adapters, base_model="bigscience/bloom-560m", params=params)
    ckpt = load("ckpt/step100", params)      # checked against these base params first
    logits = apply(model.apply, ckpt.config)(update_params(params, ckpt.extras), ckpt.adapters, ids)

A checkpoint directory holds `lora_adapter.json` (format, config, base model name, every saved
shape) and `arrays/` (orbax). Base weights are never written: only the adapters and, when the
config trains full leaves (`bias`, `trainable`), those leaves. `load` compares the manifest with
the base parameters it is given before reading any array, so a wrong base fails with the path
and both shapes, never with a partial load. Writes go to a temporary directory that is renamed
into place (`atomic_directory`), so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from . import tree, velora
from .config import DATA_INITS, LoraConfig
from .kasa import BASE_WARNING
from .lora import (ADALORA_E, KASA_DIAG, LORA_BIAS, MAGNITUDE, TOKENS, Adapters, adapter_keys, check_adapters,
                   target_paths, token_rows, trainable_mask)

PyTree = Any
MANIFEST = "lora_adapter.json"
FORMAT = "lora_jax.adapters"
VERSION = 1
# What marks a directory `atomic_directory(overwrite=True)` may replace: ours, PEFT's, an HF checkpoint.
REPLACEABLE = (MANIFEST, "adapter_config.json", "config.json")


class AdapterCheckpoint(NamedTuple):
    """What `load` returns: `extras` are the fully trained leaves {path: array} (often empty)."""

    config: LoraConfig
    adapters: Adapters
    extras: dict[str, jax.Array]
    base_model: str | None


# ----------------------------------------------------------------------------- file safety


def _fsync_tree(root: Path) -> None:
    # Flush file contents before the rename publishes them: a crash after the rename must not
    # expose files whose data never reached the disk.
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())


def _default_modes(root: Path) -> None:
    # mkdtemp makes the directory 0700 (and some writers their files 0600); what lands should carry
    # the modes any new file gets under the user's umask, like a plain save_pretrained directory.
    umask = os.umask(0)
    os.umask(umask)
    for dirpath, dirs, files in os.walk(root):
        os.chmod(dirpath, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(dirpath, name), 0o666 & ~umask)


@contextlib.contextmanager
def atomic_directory(directory: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it becomes `directory` in one rename.

    On any exception the temporary directory is removed and `directory` is untouched. An
    existing `directory` is an error unless `overwrite=True`, which replaces it as a whole; only
    an empty directory or a checkpoint (one holding any of `REPLACEABLE`) is replaced, so that a
    mistyped path ("." or a run directory) is refused rather than deleted.
    """
    directory = Path(directory).expanduser().absolute()
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} already exists; pass overwrite=True to replace it")
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} exists and is not a directory")
    if directory.exists() and any(directory.iterdir()) and not any((directory / m).is_file() for m in REPLACEABLE):
        raise FileExistsError(f"{directory} is not empty and holds no checkpoint ({', '.join(REPLACEABLE)}); "
                              "overwrite=True replaces only a checkpoint directory: pick a new path")
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Same parent, so the final os.replace is a rename within one filesystem (atomic).
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        yield tmp
        _default_modes(tmp)
        _fsync_tree(tmp)
        if directory.exists():
            old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(directory, old)
            try:
                os.replace(tmp, directory)
            except BaseException:
                os.replace(old, directory)  # the old one back under its name
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from `path`; a missing or corrupt file raises an error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected the {what})")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: the {what} is not valid JSON (truncated or corrupted?): {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the {what} must be a JSON object, got {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------- extras


def trainable_leaves(config: LoraConfig, params: PyTree) -> dict[str, jax.Array]:
    """{path: leaf} of the leaves `config` trains in full (bias policy + `trainable`)."""
    mask = tree.flatten(trainable_mask(config, params))
    return {p: x for p, x in tree.flatten(params).items() if mask[p]}


def update_params(params: PyTree, leaves: Mapping[str, Any]) -> PyTree:
    """`params` with the leaves at the given paths replaced (trained extras back into a base)."""
    flat = tree.flatten(params)
    for p, x in leaves.items():
        if p not in flat:
            raise ValueError(f"no parameter at {p!r}; closest: {tree.closest(p, list(flat))}")
        if tuple(np.shape(x)) != tuple(flat[p].shape):
            raise ValueError(f"parameter {p!r}: base shape {tuple(flat[p].shape)}, new value {tuple(np.shape(x))}")
    return tree.map_with_path(lambda p, x: leaves[p] if p in leaves else x, params)


def _needs_extras(config: LoraConfig) -> bool:
    return config.bias != "none" or config.trainable is not None


# ----------------------------------------------------------------------------- nesting


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    # orbax names its entries after dict keys; nest on '/' rather than put '/' in a key.
    out: dict[str, Any] = {}
    for path, v in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = v
    return out


def _adapter_leaves(adapters: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    return {f"{p}/{k}": x for p, ab in adapters.items() for k, x in ab.items()}


def _spec(x: Any) -> dict[str, Any]:
    return {"shape": list(np.shape(x)), "dtype": str(np.dtype(x.dtype))}


# ----------------------------------------------------------------------------- save / load


def _checkpointer():
    """An orbax checkpointer local to this process.

    Adapters are small host arrays that one process writes or reads on its own; orbax's default
    would wait at a barrier for every process of a multi-process run (`jax.distributed`).
    """
    import orbax.checkpoint as ocp

    me = jax.process_index()
    return ocp.StandardCheckpointer(
        multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me}))


def save(directory: str | os.PathLike, config: LoraConfig, adapters: Adapters, *,
         base_model: str | None = None, params: PyTree | None = None, overwrite: bool = False) -> Path:
    """Write an adapter-only checkpoint (never the base weights).

    Args:
      directory: created atomically; an existing one needs `overwrite=True`.
      config: the LoRA config (stored as JSON).
      adapters: {path: {"lora_A", "lora_B"}} (and DoRA's "lora_magnitude_vector").
      base_model: the base model's name or path, recorded for whoever loads it.
      params: the (trained) params; required when `config` trains full leaves, whose values are
        then saved. Only their shapes are read otherwise (recorded for the load-time check).
    Returns:
      the checkpoint directory.
    """
    extras: dict[str, Any] = {}
    if _needs_extras(config):
        if params is None:
            raise ValueError(
                f"config trains full leaves (bias={config.bias!r}, trainable={config.trainable!r}); "
                "pass params= so that they are saved with the adapters"
            )
        extras = trainable_leaves(config, params)
    flat = tree.flatten(params) if params is not None else {}
    if params is not None:
        check_adapters(config, params, adapters)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "base_model": base_model,
        "config": json.loads(config.to_json()),
        "adapters": {
            p: {"weight": list(flat[p].shape) if p in flat else None, **{k: _spec(x) for k, x in ab.items()}}
            for p, ab in sorted(adapters.items())
        },
        "extras": {p: _spec(x) for p, x in sorted(extras.items())},
    }
    arrays = {"adapters": _nest(_adapter_leaves(adapters))}
    if extras:
        arrays["extras"] = _nest(extras)
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        ckptr = _checkpointer()
        try:
            ckptr.save(tmp / "arrays", arrays)
            ckptr.wait_until_finished()
        finally:
            ckptr.close()
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return Path(directory).expanduser()


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's manifest (config, base model, shapes), validated; no arrays are read."""
    path = Path(directory).expanduser() / MANIFEST
    m = read_json(path, "adapter checkpoint manifest")
    if m.get("format") != FORMAT or not isinstance(m.get("adapters"), dict):
        raise ValueError(f"{path}: not a lora_jax adapter checkpoint manifest (format={m.get('format')!r})")
    if m.get("version", 0) > VERSION:
        raise ValueError(f"{path}: written by a newer lora_jax (version {m['version']} > {VERSION})")
    return m


def _check_fits(directory: Path, m: Mapping[str, Any], config: LoraConfig, params: PyTree) -> None:
    """Raise naming the path and both shapes when the checkpoint does not fit `params`."""
    flat = tree.flatten(params)
    saved = m["adapters"]
    try:
        expected = set(target_paths(config, params))
        tokens = token_rows(config, params)
    except ValueError as e:
        raise ValueError(f"{directory}: the saved LoRA config does not fit the base parameters: {e}") from None
    mismatched = []
    for p, spec in saved.items():
        if p not in flat:
            raise ValueError(f"{directory}: adapter for {p!r} has no base parameter at that path; "
                             f"closest: {tree.closest(p, list(flat))}")
        base = tuple(flat[p].shape)
        if p in tokens or TOKENS in spec:
            want = (len(tokens[p]), base[-1]) if p in tokens else None
            got = tuple(spec[TOKENS]["shape"]) if TOKENS in spec else None
            if set(spec) - {"weight"} != {TOKENS} or got != want or tuple(spec.get("weight") or base) != base:
                mismatched.append(f"{p!r}: checkpoint holds {sorted(set(spec) - {'weight'})} {got} for a table "
                                  f"{tuple(spec.get('weight') or ())}; the config's trainable_tokens need {TOKENS} "
                                  f"{want} on the base table {base}")
            continue
        *stack, d_in, d_out = config.matrix_shape(p, base) if len(base) >= 2 else (None, None)
        r = config.rank_for(p)
        want_a, want_b = (*stack, d_in, r), (*stack, r, d_out)
        got_a, got_b = (tuple(spec.get(k, {}).get("shape", ())) for k in ("lora_A", "lora_B"))
        trained_on = tuple(spec["weight"]) if spec.get("weight") is not None else None
        need = {MAGNITUDE: d_out, LORA_BIAS: d_out, KASA_DIAG: r, ADALORA_E: r,
                velora.EMBED: velora.width(d_in, config.velora_num_groups or 1)}  # [*S, n] each
        per_out = [k for k, n in need.items() if k in spec and tuple(spec[k]["shape"]) != (*stack, n)]
        if set(spec) - {"weight"} != set(adapter_keys(config)):
            mismatched.append(f"{p!r}: checkpoint holds {sorted(set(spec) - {'weight'})}; the config (use_dora="
                              f"{config.use_dora}, lora_bias={config.lora_bias}, use_kasa={config.use_kasa}, adalora="
                              f"{config.adalora is not None}) needs "
                              f"{list(adapter_keys(config))}")
        elif per_out:
            k = per_out[0]
            mismatched.append(f"{p!r}: checkpoint {k} {tuple(spec[k]['shape'])}; base parameter "
                              f"{base} (needs {(*stack, need[k])})")
        elif (trained_on is not None and trained_on != base) or (got_a, got_b) != (want_a, want_b):
            mismatched.append(
                f"{p!r}: checkpoint weight {trained_on}, lora_A {got_a}, lora_B {got_b}; "
                f"base parameter {base} (needs lora_A {want_a}, lora_B {want_b})"
            )
    if mismatched:
        raise ValueError(f"{directory}: adapters do not fit the base parameters:\n  " + "\n  ".join(mismatched))
    expected |= set(tokens)
    missing, unexpected = sorted(expected - set(saved)), sorted(set(saved) - expected)
    if missing or unexpected:
        raise ValueError(f"{directory}: the saved config targets {len(expected)} weights but the checkpoint "
                         f"holds {len(saved)} adapters; missing: {missing}; not targeted: {unexpected}")
    for p, spec in m.get("extras", {}).items():
        if p not in flat or tuple(flat[p].shape) != tuple(spec["shape"]):
            base = tuple(flat[p].shape) if p in flat else None
            raise ValueError(f"{directory}: trained leaf {p!r} has shape {tuple(spec['shape'])} in the "
                             f"checkpoint but {base} in the base parameters")


def load(directory: str | os.PathLike, params: PyTree, *, base_model: str | None = None) -> AdapterCheckpoint:
    """Read a checkpoint written by `save`, after checking it fits `params`.

    Args:
      directory: the checkpoint directory.
      params: the base parameters (arrays or `jax.ShapeDtypeStruct`s); only shapes are used.
      base_model: if given, must equal the recorded base model name.
    Returns:
      AdapterCheckpoint(config, adapters, extras, base_model); the arrays on the first local device,
      whatever mesh they were saved from (`jax.device_put` them onto yours).
    Raises:
      ValueError naming the path and both shapes when config, structure or shapes do not fit;
      ValueError naming the file when the checkpoint is truncated or corrupted.
    """
    directory = Path(directory).expanduser()
    m = read_manifest(directory)
    try:
        config = LoraConfig.from_dict(m["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{directory / MANIFEST}: invalid LoRA config: {e}") from None
    if base_model is not None and m.get("base_model") not in (None, base_model):
        raise ValueError(f"{directory}: adapters were trained on {m['base_model']!r}, not {base_model!r}")
    _check_fits(directory, m, config, params)
    if config.changes_base:
        made = (f"lora_jax.init_{config.init} makes from the base (same config and data)" if config.init in DATA_INITS
                else "lora_jax.init_residual makes from the base (same config and key)")
        warnings.warn(f"{directory}: init={config.init!r} adapters act on the residual weights that {made}, not on "
                      "the base itself; save lora_jax.to_plain's result to use them on the base", stacklevel=2)
    if config.use_kasa:
        warnings.warn(f"{directory}: {BASE_WARNING}", stacklevel=2)

    # Onto one local device, whatever mesh the arrays were saved from: orbax would otherwise restore
    # the saved sharding, which fails on another device count (trained on 4 devices, loaded on 1).
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    sds = lambda s: jax.ShapeDtypeStruct(tuple(s["shape"]), np.dtype(s["dtype"]), sharding=one)
    specs = {f"{p}/{k}": sds(s[k]) for p, s in m["adapters"].items() for k in set(s) - {"weight"}}
    target = {"adapters": _nest(specs)}
    if m.get("extras"):
        target["extras"] = _nest({p: sds(s) for p, s in m["extras"].items()})
    arrays_dir = (directory / "arrays").absolute()
    if not arrays_dir.is_dir():
        raise FileNotFoundError(f"{arrays_dir}: missing (the checkpoint's arrays)")
    ckptr = _checkpointer()
    try:
        restored = ckptr.restore(arrays_dir, target)
    except Exception as e:  # orbax/tensorstore raise many types for damaged files
        raise ValueError(f"{arrays_dir}: could not read the adapter arrays (truncated or corrupted?): "
                         f"{type(e).__name__}: {e}") from None
    finally:
        ckptr.close()
    flat = tree.flatten(restored)
    adapters: Adapters = {p: {k: flat[f"adapters/{p}/{k}"] for k in sorted(set(s) - {"weight"})}
                          for p, s in m["adapters"].items()}
    extras = {p: flat[f"extras/{p}"] for p in m.get("extras", {})}
    return AdapterCheckpoint(config, adapters, extras, m.get("base_model"))
