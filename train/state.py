"""Training-state checkpoints with orbax: trainable tree, optimizer state, step, data position.

Orbax writes each step into a temporary directory and renames it when complete, so a process
killed mid-save leaves the previous checkpoint as the latest loadable one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any


def _as_dict(tree: PyTree) -> dict[str, np.ndarray]:
    # Leaves keyed by index: the tree structure comes back from a fresh init of the same run,
    # which sidesteps orbax's handling of None holes and optax NamedTuples.
    return {f"{i:05d}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(tree))}


def _from_dict(d: dict[str, Any], like: PyTree, what: str) -> PyTree:
    leaves, treedef = jax.tree.flatten(like)
    if len(d) != len(leaves):
        raise ValueError(f"checkpoint {what} has {len(d)} arrays, this run expects {len(leaves)}: "
                         "resume with the same model, LoRA and optimizer flags")
    out = []
    for i, ref in enumerate(leaves):
        x = np.asarray(d[f"{i:05d}"])
        if x.shape != np.shape(ref):
            raise ValueError(f"checkpoint {what} array {i} has shape {x.shape}, this run expects {np.shape(ref)}")
        out.append(x.astype(np.asarray(ref).dtype))
    return jax.tree.unflatten(treedef, out)


class TrainCheckpoints:
    """Save / restore (trainable, opt_state, meta) under `directory`, keeping the last `keep` (None: all)."""

    def __init__(self, directory: str | Path, keep: int | None = 2):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep))

    def save(self, step: int, trainable: PyTree, opt_state: PyTree, meta: dict[str, Any]) -> None:
        state = {"trainable": _as_dict(trainable), "opt_state": _as_dict(opt_state)}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({**meta, "step": step})))
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
        return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def restore(self, trainable_like: PyTree, opt_state_like: PyTree, step: int | None = None):
        """(trainable, opt_state, meta) of `step` (default: the latest complete checkpoint)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint under {self.directory}")
        got = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
        state, meta = got["state"], dict(got["meta"])
        return (_from_dict(state["trainable"], trainable_like, "trainable tree"),
                _from_dict(state["opt_state"], opt_state_like, "optimizer state"), meta)

    def close(self) -> None:
        self.manager.close()


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename): readers never see half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    tmp.replace(path)
