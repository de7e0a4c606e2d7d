"""Parameter-tree utilities: '/'-joined path names, pattern matching, masks, partition/combine.

Every selection in lora_jax (LoRA targets, excludes, extra trainable leaves, per-path rank and
alpha overrides) goes through `matches`, so a pattern means the same thing everywhere.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import quax

PyTree = Any
# Leaf names that hold a layer's weight matrix; a module-level pattern (`c_attn`) selects them.
LINEAR_NAMES = ("kernel", "weight", "w")  # a linear layer's matrix
EMBEDDING_NAME = "embedding"  # a flax `nn.Embed` table [V, D], looked up by row
WEIGHT_NAMES = (*LINEAR_NAMES, EMBEDDING_NAME)


def leaf_name(path: str) -> str:
    """The last component of a '/'-joined path (`kernel`, `bias`, `embedding`)."""
    return path.rsplit("/", 1)[-1]


def _key_str(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(keypath: Sequence[Any]) -> str:
    """'/'-joined name of a `tree_flatten_with_path` key path; NNX `value` wrappers dropped."""
    parts = [_key_str(k) for k in keypath]
    # nnx.Variable state adds a trailing `.value` (an attribute key); a dict key 'value' is a name
    if len(parts) > 1 and isinstance(keypath[-1], jax.tree_util.GetAttrKey) and parts[-1] == "value":
        parts = parts[:-1]
    return "/".join(parts)


def is_value(x: Any) -> bool:
    """quax array values (a quantized weight) are one leaf here, not their inner arrays."""
    return isinstance(x, quax.ArrayValue)


def flatten(tree: PyTree) -> dict[str, Any]:
    """{path: leaf} for every array leaf of `tree`, in tree order; a ValueError when two leaves
    share a name (a dict key holding '/': {'a/b': x, 'a': {'b': y}})."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_value)
    flat = {path_str(kp): leaf for kp, leaf in leaves}
    if len(flat) != len(leaves):
        seen: dict[str, Any] = {}
        for kp, _ in leaves:
            if (p := path_str(kp)) in seen:
                raise ValueError(f"two parameters share the path name {p!r}: {jax.tree_util.keystr(seen[p])} and "
                                 f"{jax.tree_util.keystr(kp)} (a key holding '/'?); rename one")
            seen[p] = kp
    return flat


def map_with_path(fn: Callable[[str, Any], Any], tree: PyTree, *rest: PyTree) -> PyTree:
    """`jax.tree.map` whose function also receives the leaf's '/'-joined path."""
    return jax.tree_util.tree_map_with_path(lambda kp, *xs: fn(path_str(kp), *xs), tree, *rest, is_leaf=is_value)


OUTPUT_HEADS = ("score", "classifier", "qa_outputs")  # task heads at the top of a params tree (transformers' names)


def linear_paths(flat: dict[str, Any]) -> list[str]:
    """PEFT's "all-linear": every linear matrix (stacks included) but the output head. Embedding
    tables are not linear layers; GPT-2's and BLOOM's LM heads are their tied embeddings, other
    models' an `lm_head`; a task head (`OUTPUT_HEADS`, trained in full as PEFT's modules_to_save)
    is left out too, as PEFT leaves out a classifier's."""
    return [p for p, x in flat.items() if leaf_name(p) in LINEAR_NAMES and len(getattr(x, "shape", ())) >= 2
            and "lm_head" not in p.split("/") and _top(p) not in OUTPUT_HEADS]


def _top(path: str) -> str:
    """The first module of `path`, under a linen `params` collection if there is one."""
    parts = path.split("/")
    return parts[1] if parts[0] == "params" and len(parts) > 2 else parts[0]


def matches(pattern: str | Sequence[str], path: str) -> bool:
    """Whether `path` is selected by `pattern`.

    A string is a regex that must `re.fullmatch` the whole path or one of its module prefixes
    (`.*h/\\d+/attn/c_attn` selects `.../c_attn/kernel` and `.../c_attn/bias`). A list of names
    selects paths that contain any name as a run of '/'-separated components (`c_attn`,
    `attn/c_attn`) before the leaf name, or as the whole path.
    """
    parts = path.split("/")
    if isinstance(pattern, str):
        rx = re.compile(pattern)
        return any(rx.fullmatch("/".join(parts[:i])) for i in range(len(parts), 0, -1))
    for name in pattern:
        if name == path:
            return True
        sub = name.strip("/").split("/")
        n = len(sub)
        if any(parts[i : i + n] == sub for i in range(len(parts) - n)):
            return True
    return False


def matches_leaf(pattern: str | Sequence[str], path: str) -> bool:
    """Whether `pattern` names the leaf at `path` itself: a regex fullmatching the whole path, or a
    name that is the path's last '/'-separated components (`experts/w_in`, `w_in`)."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, path) is not None
    parts = path.split("/")
    return any(parts[len(parts) - len(sub):] == sub for sub in (name.strip("/").split("/") for name in pattern))


def select(pattern: str | Sequence[str] | None, paths: Iterable[str]) -> list[str]:
    """The paths that `pattern` selects (none for a None pattern)."""
    if pattern is None:
        return []
    return [p for p in paths if matches(pattern, p)]


def closest(pattern: str | Sequence[str], paths: Sequence[str], n: int = 5) -> list[str]:
    """Existing paths and module names nearest to a pattern that matched nothing (for errors)."""
    words = [pattern] if isinstance(pattern, str) else list(pattern)
    candidates = sorted(set(paths) | {c for p in paths for c in p.split("/")})
    found: list[str] = []
    for w in words:
        found += difflib.get_close_matches(w, candidates, n=n, cutoff=0.3)
    return list(dict.fromkeys(found))[:n] or list(paths)[:n]


def mask(tree: PyTree, pattern: str | Sequence[str] | None) -> PyTree:
    """A bool tree: True where `pattern` selects the leaf's path."""
    return map_with_path(lambda p, _: pattern is not None and matches(pattern, p), tree)


def partition(tree: PyTree, mask_tree: PyTree) -> tuple[PyTree, PyTree]:
    """Split `tree` into (selected, rest); each has None where the other holds the leaf."""
    sel = jax.tree.map(lambda m, x: x if m else None, mask_tree, tree)
    rest = jax.tree.map(lambda m, x: None if m else x, mask_tree, tree)
    return sel, rest


def combine(*trees: PyTree) -> PyTree:
    """Inverse of `partition`: the first non-None leaf at each position."""
    def first(*xs):
        for x in xs:
            if x is not None:
                return x
        return None
    return jax.tree.map(first, *trees, is_leaf=lambda x: x is None or is_value(x))


def count(tree: PyTree) -> int:
    """Number of array elements in a tree (None holes count zero)."""
    return sum(int(getattr(x, "size", 0)) for x in jax.tree.leaves(tree, is_leaf=is_value))
