"""Training-state checkpoints with orbax: trainable tree, optimizer state, step, data position.

Orbax writes each step into a temporary directory and renames it when complete, so a process
killed mid-save leaves the previous checkpoint as the latest loadable one. Each leaf's key path is
saved too: a resumed run whose tree differs (other targets, layers or optimizer flags) is refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any
LEAVES = "leaves"  # meta key: the key paths of the saved leaves, checked on restore


def _as_dict(tree: PyTree) -> dict[str, np.ndarray]:
    # Leaves keyed by index: the tree structure comes back from a fresh init of the same run,
    # which sidesteps orbax's handling of None holes and optax NamedTuples.
    return {f"{i:05d}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(tree))}


def _names(tree: PyTree) -> list[str]:
    """Each leaf's key path, in `_as_dict`'s order (e.g. "['adapters']['transformer/h/0/attn/c_attn']['lora_A']")."""
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _from_dict(d: dict[str, Any], like: PyTree, what: str, names: list[str] | None = None) -> PyTree:
    """`like`'s tree with the arrays of `d`; `names` (the saved leaves' key paths; None in older
    checkpoints) must be `like`'s: a run with other targets or layers has leaves of the same shapes."""
    leaves, treedef = jax.tree.flatten(like)
    now = _names(like)
    if names is not None and names != now:
        gone, new = [n for n in names if n not in now], [n for n in now if n not in names]
        differ = (f"it holds {gone[0]}, which this run lacks" if gone else
                  f"this run has {new[0]}, which it lacks" if new else "its leaves come in another order")
        raise ValueError(f"checkpoint {what} does not fit this run: {differ}: "
                         "resume with the same model, LoRA and optimizer flags")
    if len(d) != len(leaves):
        raise ValueError(f"checkpoint {what} has {len(d)} arrays, this run expects {len(leaves)}: "
                         "resume with the same model, LoRA and optimizer flags")
    out = []
    for i, ref in enumerate(leaves):
        x = np.asarray(d[f"{i:05d}"])
        if x.shape != np.shape(ref):
            raise ValueError(f"checkpoint {what} {now[i]} has shape {x.shape}, this run expects {np.shape(ref)}: "
                             "resume with the same model, LoRA and optimizer flags")
        out.append(x.astype(np.asarray(ref).dtype))
    return jax.tree.unflatten(treedef, out)


class TrainCheckpoints:
    """Save / restore (trainable, opt_state, meta) under `directory`, keeping the last `keep` (None: all)."""

    def __init__(self, directory: str | Path, keep: int | None = 2):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep))

    def save(self, step: int, trainable: PyTree, opt_state: PyTree, meta: dict[str, Any]) -> None:
        state = {"trainable": _as_dict(trainable), "opt_state": _as_dict(opt_state)}
        names = {"trainable": _names(trainable), "opt_state": _names(opt_state)}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({**meta, "step": step, LEAVES: names})))
        self.manager.wait_until_finished()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def drop_after(self, step: int) -> None:
        """Delete the checkpoints of steps after `step` (a resumed run goes on from `step`; orbax
        would not save a step below a later one)."""
        for s in self.manager.all_steps():
            if s > step:
                self.manager.delete(s)

    def drop_before(self, step: int) -> None:
        """Delete the checkpoints of steps before `step`."""
        for s in self.manager.all_steps():
            if s < step:
                self.manager.delete(s)

    def read_meta(self, step: int) -> dict[str, Any]:
        """The meta dict saved with `step` (its arrays left on disk)."""
        meta = dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
        meta.pop(LEAVES, None)
        return meta

    def restore(self, trainable_like: PyTree, opt_state_like: PyTree, step: int | None = None):
        """(trainable, opt_state, meta) of `step` (default: the latest complete checkpoint)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint under {self.directory}")
        got = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
        state, meta = got["state"], dict(got["meta"])
        names = meta.pop(LEAVES, {})  # (older checkpoints hold no names)
        return (_from_dict(state["trainable"], trainable_like, "trainable tree", names.get("trainable")),
                _from_dict(state["opt_state"], opt_state_like, "optimizer state", names.get("opt_state")), meta)

    def close(self) -> None:
        self.manager.close()


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename): readers never see half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    tmp.replace(path)
