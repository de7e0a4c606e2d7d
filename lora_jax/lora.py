"""LoRA as a pure transform over parameter pytrees: init, apply (factored or merged), merge.

Adapters are a flat dict keyed by the targeted leaf's '/'-joined path (what PEFT and orbax
files hold): `{"transformer/h/0/attn/c_attn/kernel": {"lora_A": [in, r], "lora_B": [r, out]}}`,
plus `"lora_magnitude_vector": [out]` with DoRA, `"lora_B_bias": [out]` with lora_bias and
`"lora_diag": [r]` with KaSA (the update is then s * A diag(d) B); an embedding table's trained
rows (`LoraConfig.trainable_tokens`) are `{table path: {"trainable_tokens_delta": [n, D]}}`. A
stacked kernel [*S, in, out] (layers under scan) gets factors [*S, in, r] / [*S, r, out] (a
magnitude [*S, out], a diagonal [*S, r]); a kernel with several input or output axes
[*S, *in, *out] (`LoraConfig.axes_pattern`) those of its matrix [*S, prod(in), prod(out)].
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import bdlora, quant, tree, velora
from .config import ALL_LINEAR, DATA_INITS, MICA, PLAIN_INITS, LoraConfig
from .lazy import LoraArray, as_matrix, column_norms, dense, dora_weight, lift, quaxify

PyTree = Any
Adapters = dict[str, dict[str, jax.Array]]
STRATEGIES = ("factored", "merged")
MAGNITUDE = "lora_magnitude_vector"  # DoRA's per-output magnitude, PEFT's name
LORA_BIAS = "lora_B_bias"  # lora_B's bias [*S, out] (lora_bias), PEFT's lora_B.bias
TOKENS = "trainable_tokens_delta"  # trained embedding rows [n, D] (trainable_tokens), PEFT's name
KASA_DIAG = "lora_diag"  # KaSA's trained singular values [*S, r] between A and B, PEFT's name
ADALORA_E = "lora_E"  # AdaLoRA's singular values [*S, r] between A and B (PEFT's lora_E, (r, 1) there)


# Where each data-driven init is made.
DATA_INIT_CALLS = {"eva": "init_eva(config, params, f, batches) -> (config, adapters)",
                   "corda": "init_corda(config, params, f, batches) -> (params, adapters)",
                   "lora_ga": "init_lora_ga(config, params, loss_fn, batches) -> (params, adapters)"}


def check_not_data_init(config: LoraConfig) -> None:
    """Raise, naming the function to call, when `config.init` is computed on data."""
    if config.init in DATA_INITS:
        raise ValueError(f"init={config.init!r} is computed on data: use lora_jax.{DATA_INIT_CALLS[config.init]}")


def diag_key(config: LoraConfig) -> str | None:
    """The adapter's trained diagonal [*S, r] between A and B: KaSA's `lora_diag`, AdaLoRA's
    `lora_E`, or None."""
    return KASA_DIAG if config.use_kasa else ADALORA_E if config.adalora is not None else None


def velora_fixed(config: LoraConfig) -> bool:
    """Whether each adapter holds VeLoRA's fixed projection (init_type "random" / "batch_average_once")."""
    return config.velora_num_groups is not None and config.velora_init_type in velora.FIXED


def adapter_keys(config: LoraConfig) -> tuple[str, ...]:
    """The leaves of each adapter: lora_A, lora_B, DoRA's magnitude when `use_dora`, lora_B's bias
    when `lora_bias`, KaSA's or AdaLoRA's diagonal (`diag_key`), VeLoRA's fixed projection."""
    diag = diag_key(config)
    return ("lora_A", "lora_B", *((MAGNITUDE,) if config.use_dora else ()),
            *((LORA_BIAS,) if config.lora_bias else ()), *((diag,) if diag else ()),
            *((velora.EMBED,) if velora_fixed(config) else ()))


def delta_b(ab: Mapping[str, jax.Array]) -> jax.Array:
    """The B of the update s * A B: lora_B [*S, r, out], times KaSA's or AdaLoRA's diagonal [*S, r]
    when the adapter has one (A diag(d) B = A (d B)), so every rule and merge sees a plain factor pair."""
    b = ab["lora_B"]
    d = next((ab[k] for k in (KASA_DIAG, ADALORA_E) if k in ab), None)
    return b if d is None else (d[..., :, None] * b).astype(b.dtype)


def orth_norms(a: jax.Array, b: jax.Array, present: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(||A^T A - I||_F, ||B B^T - I||_F), each [*S], in fp32 for factors a [*S, in, r] and b
    [*S, r, out] (PEFT's A A^T and B^T B for its (r, in) A and (out, r) B): the orthogonality
    penalties of KaSA's and AdaLoRA's regularisers. `present` [*S, r] keeps those triplets' rows
    and columns only; the gradient at a zero norm is zero, not NaN."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    eye = jnp.eye(a.shape[-1], dtype=jnp.float32)
    pair = None if present is None else present[..., :, None] & present[..., None, :]  # [*S, r, r]
    out = []
    for gram in (jnp.einsum("...ir,...iq->...rq", a, a), jnp.einsum("...ro,...qo->...rq", b, b)):  # [*S, r, r]
        m = gram - eye if pair is None else jnp.where(pair, gram - eye, 0.0)
        sq = jnp.sum(m * m, axis=(-2, -1))
        out.append(jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0))
    return out[0], out[1]


def bias_path(path: str) -> str:
    """The bias leaf of the module whose weight is at `path` (`.../c_attn/kernel` -> `.../c_attn/bias`)."""
    return path.rsplit("/", 1)[0] + "/bias"


def target_paths(config: LoraConfig, params: PyTree) -> list[str]:
    """Paths of the weight matrices `config` adapts; a clear ValueError when it selects none."""
    flat = tree.flatten(params)
    paths = list(flat)
    selected = tree.linear_paths(flat) if config.targets == ALL_LINEAR else tree.select(config.targets, paths)
    excluded = set(tree.select(config.exclude, paths))
    chosen = {p for p in selected if tree.leaf_name(p) in tree.WEIGHT_NAMES}
    if config.target_parameters is not None:  # any leaf, named by its own path
        chosen |= {p for p in paths if tree.matches_leaf(config.target_parameters, p)}
    found = [p for p in paths if p in chosen and p not in excluded]
    if not found:
        asked = config.targets if config.target_parameters is None else config.target_parameters
        params_too = "" if config.target_parameters is None else f", target_parameters {config.target_parameters!r}"
        raise ValueError(
            f"LoRA targets {config.targets!r}{params_too} match no weight in the parameters "
            f"(exclude={config.exclude!r}); closest existing paths: {tree.closest(asked, paths)}"
        )
    if config.layers_to_transform is not None:
        # (a kernel that is no matrix stays, for the shape check below to name it)
        gates = {p: _layers(config, p, flat[p].shape) for p in found if len(getattr(flat[p], "shape", ())) >= 2}
        kept = [p for p in found if p not in gates or gates[p].any()]
        if not kept:
            seen = sorted({i for p in found if (i := config.layer_index(p)) is not None})
            raise ValueError(f"layers_to_transform={list(config.layers_to_transform)} (layers_pattern="
                             f"{config.layers_pattern!r}) keeps none of the {len(found)} targeted weights, e.g. "
                             f"{found[0]!r}; the layer numbers in their paths: {seen or 'none'}")
        found = kept
    if config.trainable is not None and (both := [p for p in found if tree.matches(config.trainable, p)]):
        # W0 stays frozen under its adapter: trained in full too, it would only decay (PEFT never adapts
        # a modules_to_save module)
        raise ValueError(f"{both[0]!r} is a LoRA target and trained in full (trainable={config.trainable!r}): "
                         "it would never train; leave it out of one of them")
    for p in found:
        shape = getattr(flat[p], "shape", ())
        if len(shape) < 2:
            raise ValueError(f"LoRA target {p!r} has shape {tuple(shape)}: not a matrix or a stack of matrices")
        r, view = config.rank_for(p), config.matrix_shape(p, shape)
        if r > min(view[-2:]) and config.init not in PLAIN_INITS:  # random factors take any rank, as in PEFT
            shown = tuple(shape) if view == tuple(shape) else f"{tuple(shape)} (as the matrix stack {view})"
            raise ValueError(f"LoRA rank {r} at {p!r} exceeds min(in, out) of its shape {shown}: init "
                             f"{config.init!r} takes r directions of the weight")
        if config.use_dora and tree.leaf_name(p) not in tree.WEIGHT_NAMES:
            raise ValueError(f"DoRA targets linear layers and embeddings; {p!r} is neither (exclude it or drop "
                             "use_dora)")
        if config.use_kasa and (tree.leaf_name(p) not in tree.LINEAR_NAMES or r >= min(view[-2:])):
            raise ValueError(f"KaSA (use_kasa) truncates the r smallest singular components of linear layers and "
                             f"keeps at least one: {p!r} {tuple(shape)} with rank {r} is "
                             f"{'not a linear layer' if tree.leaf_name(p) not in tree.LINEAR_NAMES else 'too small'}")
        if config.adalora is not None and tree.leaf_name(p) not in tree.LINEAR_NAMES:
            raise ValueError(f"AdaLoRA (adalora) adapts linear layers (PEFT's SVDLinear); {p!r} is not one")
        if config.velora_num_groups is not None and tree.leaf_name(p) not in tree.LINEAR_NAMES:
            raise ValueError(f"VeLoRA (velora_num_groups) adapts linear layers; {p!r} is not one")
        if config.alora_invocation_tokens is not None and tree.leaf_name(p) not in tree.LINEAR_NAMES:
            raise ValueError(f"aLoRA (alora_invocation_tokens) adapts linear layers; {p!r} is not one")
        if config.use_bdlora is not None:
            if bdlora.side(config, p) is not None and tree.leaf_name(p) not in tree.LINEAR_NAMES:
                raise ValueError(f"BD-LoRA (use_bdlora) makes linear layers' factors block-diagonal; {p!r} is not "
                                 "one (exclude it from target_modules_bd_a / _bd_b)")
            bdlora.check_shape(config, p, view[-2], r, view[-1])
        if config.init == "orthogonal" and r % 2:
            raise ValueError(f"init='orthogonal' needs an even rank; {p!r} has rank {r}")
        if config.layers_to_transform is not None and not gates[p].all():
            trains = [n for n, on in (("its DoRA magnitude", config.use_dora), ("lora_B's bias", config.lora_bias),
                                      ("KaSA's diagonal and truncation", config.use_kasa),
                                      ("AdaLoRA's triplets (and their budget)", config.adalora is not None),
                                      ("its bias (bias='lora_only')", config.bias == "lora_only")) if on]
            if trains:
                raise ValueError(f"layers_to_transform adapts layers {np.flatnonzero(gates[p]).tolist()} of the "
                                 f"stack {p!r} {tuple(shape)}; {' and '.join(trains)} would train in every "
                                 "layer of it: use unstacked params (scan_layers=False)")
        if config.lora_bias:
            b = flat.get(bias_path(p))
            if tree.leaf_name(p) not in tree.LINEAR_NAMES or b is None or math.prod(b.shape) != math.prod(
                    (*view[:-2], view[-1])):
                raise ValueError(f"lora_bias adds to the bias of each targeted linear layer; {p!r} has "
                                 f"{'no bias' if b is None else f'bias {tuple(b.shape)}'} fitting its output "
                                 f"{(*view[:-2], view[-1])} (exclude it or drop lora_bias)")
    return found


def _layers(config: LoraConfig, path: str, shape: tuple[int, ...]) -> np.ndarray:
    """Under layers_to_transform: bools [*S] over the matrices [*S, in, out] of the kernel at `path`,
    whether each is adapted: all or none by the layer number in the path, else per index of a
    single stack dim (a layer stack)."""
    stack = config.matrix_shape(path, shape)[:-2]
    i = config.layer_index(path)
    if i is not None:
        return np.full(stack, i in config.layers_to_transform)
    if len(stack) == 1 and config.names_layers(path):
        return np.isin(np.arange(stack[0]), config.layers_to_transform)
    return np.zeros(stack, bool)


def layer_gate(config: LoraConfig, path: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """Which matrices [*S] of the targeted kernel at `path` (of `shape`) layers_to_transform adapts:
    None when all of them; else bools, the factors of the others staying zero (zero A and B get
    zero gradients, so they never move)."""
    if config.layers_to_transform is None:
        return None
    gate = _layers(config, path, tuple(shape))
    return None if gate.all() else gate


def resolve_tokens(spec: tuple[int, ...] | Mapping[str, tuple[int, ...]],
                   tables: list[str]) -> dict[str, tuple[int, ...]]:
    """{table path: ids} for `trainable_tokens` over the candidate embedding `tables`: a list names
    the one table there is, a mapping one table per module name."""
    if isinstance(spec, tuple):
        if len(tables) != 1:
            raise ValueError(f"LoraConfig.trainable_tokens as a list trains rows of the params' one embedding table; "
                             f"these have {len(tables)}: {tables[:5]}; name it, e.g. {{'wte': [...]}}")
        return {tables[0]: spec}
    chosen: dict[str, tuple[int, ...]] = {}
    for name, ids in spec.items():
        hits = [p for p in tables if tree.matches((name,), p)]
        if len(hits) != 1 or hits[0] in chosen:
            raise ValueError(f"LoraConfig.trainable_tokens[{name!r}] must select one embedding table of its own "
                             f"(a leaf named 'embedding'); it selects {hits}; tables: {tables[:5]}")
        chosen[hits[0]] = ids
    return chosen


def token_rows(config: LoraConfig, params: PyTree) -> dict[str, tuple[int, ...]]:
    """{embedding table path: token ids} that `config.trainable_tokens` trains (empty without it)."""
    spec = config.trainable_tokens
    if spec is None:
        return {}
    flat = tree.flatten(params)
    tables = [p for p, x in flat.items()
              if tree.leaf_name(p) == tree.EMBEDDING_NAME and len(getattr(x, "shape", ())) == 2]
    chosen = resolve_tokens(spec, tables)
    lora = set(target_paths(config, params))
    for p, ids in chosen.items():
        if p in lora:
            raise ValueError(f"{p!r} is both a LoRA target and the table of trainable_tokens: exclude it from the "
                             "targets (its chosen rows train in full)")
        rows = flat[p].shape[0]
        if max(ids) >= rows:
            raise ValueError(f"LoraConfig.trainable_tokens: token id(s) {[i for i in ids if i >= rows][:5]} are out "
                             f"of range for {p!r} with {rows} rows")
    return chosen


def init_tokens(config: LoraConfig, params: PyTree, *, dtype: Any = jnp.float32) -> Adapters:
    """{table: {"trainable_tokens_delta": the chosen rows [n, D]}}: PEFT's init, the original rows,
    so the model starts unchanged."""
    flat, out = tree.flatten(params), {}
    for p, ids in token_rows(config, params).items():
        if isinstance(flat[p], jax.ShapeDtypeStruct):
            raise ValueError(f"trainable_tokens start from the rows of {p!r}: init needs the weights, "
                             "not ShapeDtypeStruct")
        out[p] = {TOKENS: jnp.asarray(flat[p])[jnp.asarray(ids)].astype(dtype)}
    return out


def init(config: LoraConfig, params: PyTree, key: jax.Array, *, dtype: Any = jnp.float32) -> Adapters:
    """Fresh adapters as PEFT initialises them (`config.init`): A random and B = 0, (`orthogonal`)
    both random with A B = 0, or (`mica`) A = 0 and B from W0's SVD, so LoRA starts as identity;
    an embedding table's A = 0 and B ~ N(0, 1) (PEFT's lora_embedding_A / _B) for every plain init.

    Args:
      config: which leaves, which rank.
      params: the frozen parameter tree (arrays or `jax.ShapeDtypeStruct`s).
      key: PRNG key for A.
      dtype: factor dtype (fp32 by default, as PEFT keeps adapters in fp32).
    Returns:
      {path: {"lora_A": [*S, in, r], "lora_B": [*S, r, out]}}; with DoRA also
      "lora_magnitude_vector": [*S, out], W0's column norms (so DoRA starts as identity too); with
      AdaLoRA also "lora_E": [*S, r], zeros (A and B both random).
    """
    check_not_data_init(config)
    if config.changes_base:
        raise ValueError(f"init={config.init!r} takes part of W0 into the adapter and changes the base weights: "
                         "use lora_jax.init_residual(config, params, key) -> (params, adapters)")
    if config.use_kasa:
        raise ValueError("use_kasa (KaSA) truncates the base weights: use lora_jax.init_kasa(config, params, key) "
                         "-> (params, adapters)")
    flat = tree.flatten(params)
    out: Adapters = {}
    for i, p in enumerate(target_paths(config, params)):
        if (config.use_dora or config.init == MICA) and isinstance(flat[p], jax.ShapeDtypeStruct):
            what = "DoRA's magnitude starts at the column norms" if config.use_dora else "MiCA's B is made of the SVD"
            raise ValueError(f"{what} of {p!r}: init needs the weights, not {type(flat[p]).__name__}")
        *stack, d_in, d_out = view = config.matrix_shape(p, flat[p].shape)
        r = config.rank_for(p)
        k = jax.random.fold_in(key, i)
        b = jnp.zeros((*stack, r, d_out), dtype)
        if config.adalora is not None:  # PEFT's AdaLoRA: A, B ~ N(0, 0.02^2); E = 0 below
            a = 0.02 * jax.random.normal(k, (*stack, d_in, r), dtype)
            b = 0.02 * jax.random.normal(jax.random.fold_in(k, 1), (*stack, r, d_out), dtype)
        elif bdlora.side(config, p) == "a":  # PEFT: torch's default kaiming_uniform_ (a=0) over in/nblocks inputs
            bound = math.sqrt(6.0 / (d_in // config.use_bdlora.nblocks))
            a = jax.random.uniform(k, (*stack, d_in, r), dtype, -bound, bound)
        elif tree.leaf_name(p) == tree.EMBEDDING_NAME and config.init in PLAIN_INITS:
            # PEFT's Embedding, whatever the plain init: A = 0 and B ~ N(0, 1) (nn.Embedding's own init)
            a = jnp.zeros((*stack, d_in, r), dtype)
            b = jax.random.normal(jax.random.fold_in(k, 1), (*stack, r, d_out), dtype)
        elif config.init == "kaiming_uniform":  # torch kaiming_uniform_(a=sqrt(5)) on (r, in)
            bound = 1.0 / math.sqrt(d_in)
            a = jax.random.uniform(k, (*stack, d_in, r), dtype, -bound, bound)
        elif config.init == "gaussian":  # PEFT "gaussian": N(0, 1/r^2)
            a = jax.random.normal(k, (*stack, d_in, r), dtype) / r
        elif config.init == MICA:
            a, b = _mica(dense(flat[p]), view, r, dtype)
        else:
            a, b = _orthogonal(k, view, r, dtype)
        a, b = bdlora.masked(config, p, a, b)
        gate = layer_gate(config, p, flat[p].shape)
        if gate is not None:
            a, b = a * gate[..., None, None], b * gate[..., None, None]
        out[p] = {"lora_A": a, "lora_B": b}
        if config.lora_bias:
            out[p][LORA_BIAS] = jnp.zeros((*stack, d_out), dtype)
        if config.use_dora:
            out[p][MAGNITUDE] = column_norms(dense(flat[p]).reshape(view)).astype(dtype)  # [*S, out]
        if config.adalora is not None:
            out[p][ADALORA_E] = jnp.zeros((*stack, r), dtype)
        if velora_fixed(config):  # PEFT: a random unit vector, or zeros until the first batch sets it
            shape = (*stack, velora.width(d_in, config.velora_num_groups))
            out[p][velora.EMBED] = (velora.unit(jax.random.normal(jax.random.fold_in(k, 2), shape)).astype(dtype)
                                    if config.velora_init_type == "random" else jnp.zeros(shape, dtype))
    return out | init_tokens(config, params, dtype=dtype)


def _mica(w: jax.Array, view: tuple[int, ...], r: int, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """PEFT's MiCA: A = 0 and B = the r right singular vectors of W0 [in, out] with the smallest
    singular values (PEFT's minor left singular vectors of its (out, in) weight, as rows of B)."""
    *stack, d_in, d_out = view
    m = jnp.asarray(w, jnp.float32).reshape(-1, d_in, d_out)  # [prod(S), in, out]
    with jax.default_matmul_precision("highest"):
        vh = jax.vmap(lambda x: jnp.linalg.svd(x, full_matrices=False)[2])(m)  # [prod(S), k, out]
    return jnp.zeros((*stack, d_in, r), dtype), vh[:, -r:].reshape(*stack, r, d_out).astype(dtype)


def _orthogonal(key: jax.Array, view: tuple[int, ...], r: int, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """PEFT's `orthogonal` init: A = R1 Q_odd / 10, B = Q_even^T R2 / 10 with Q a random r x r
    rotation (r even: `target_paths` checks), so A B = Q_odd Q_even^T = 0 while both factors
    train from nonzero values."""
    *stack, d_in, d_out = view
    kq, ka, kb = jax.random.split(key, 3)
    q = jnp.linalg.qr(jax.random.normal(kq, (*stack, r, r)))[0]  # [*S, r, r], orthonormal rows
    q_odd, q_even = q[..., 0::2, :], q[..., 1::2, :]  # [*S, r/2, r] each, mutually orthogonal
    a = jax.random.normal(ka, (*stack, d_in, r // 2)) @ q_odd / 10.0  # [*S, in, r]
    b = jnp.swapaxes(q_even, -1, -2) @ jax.random.normal(kb, (*stack, r // 2, d_out)) / 10.0  # [*S, r, out]
    return a.astype(dtype), b.astype(dtype)


def check_adapters(config: LoraConfig, params: PyTree, adapters: Mapping[str, Any]) -> None:
    """Raise a ValueError naming the path and both shapes when adapters do not fit params."""
    _check(config, params, adapters)


def _check(config: LoraConfig, params: PyTree, adapters: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """`check_adapters`, returning the trainable_tokens rows {table: ids} it resolved on the way."""
    flat = tree.flatten(params)
    keys = adapter_keys(config)
    tokens = token_rows(config, params)
    for p, ab in adapters.items():
        if p not in flat:
            raise ValueError(f"adapter for {p!r} has no parameter at that path; closest: {tree.closest(p, list(flat))}")
        if p in tokens or TOKENS in ab:
            want = (len(tokens[p]), flat[p].shape[-1]) if p in tokens else None
            got = tuple(ab[TOKENS].shape) if TOKENS in ab else None
            if set(ab) != {TOKENS} or got != want:
                raise ValueError(f"adapter at {p!r} must hold only {TOKENS} {want} (trainable_tokens "
                                 f"{None if p not in tokens else list(tokens[p])}), got "
                                 f"{ {k: tuple(v.shape) for k, v in ab.items()} }")
            continue
        if set(ab) != set(keys):
            raise ValueError(f"adapter at {p!r} must hold exactly {', '.join(keys)} (use_dora={config.use_dora}, "
                             f"lora_bias={config.lora_bias}, use_kasa={config.use_kasa}, adalora="
                             f"{config.adalora is not None}), got {sorted(ab)}")
        if LORA_BIAS in ab and bias_path(p) not in flat:
            raise ValueError(f"adapter at {p!r} has a {LORA_BIAS} but its module has no bias {bias_path(p)!r}")
        w, a, b = flat[p].shape, ab["lora_A"].shape, ab["lora_B"].shape
        *stack, d_in, d_out = config.matrix_shape(p, w) if len(w) >= 2 else (None, None)
        r = a[-1] if len(a) >= 2 else None
        m = tuple(ab[MAGNITUDE].shape) if config.use_dora else (*stack, d_out)
        bias = tuple(ab[LORA_BIAS].shape) if config.lora_bias else (*stack, d_out)
        dk = diag_key(config)
        diag = tuple(ab[dk].shape) if dk else (*stack, r)
        if velora_fixed(config) and len(w) >= 2:
            want = (*stack, velora.width(d_in, config.velora_num_groups))
            if tuple(ab[velora.EMBED].shape) != want:
                raise ValueError(f"adapter at {p!r} has {velora.EMBED} {tuple(ab[velora.EMBED].shape)}; VeLoRA's "
                                 f"{config.velora_num_groups} groups of its {d_in} inputs need {want}")
        if len(w) < 2 or tuple(a) != (*stack, d_in, r) or tuple(b) != (*stack, r, d_out) or m != (*stack, d_out) \
                or bias != (*stack, d_out) or diag != (*stack, r):
            raise ValueError(
                f"adapter at {p!r} does not fit the parameter: weight {tuple(w)}, lora_A {tuple(a)}, "
                f"lora_B {tuple(b)}" + (f", {MAGNITUDE} {m}" if config.use_dora else "") +
                (f", {LORA_BIAS} {bias}" if config.lora_bias else "") +
                (f", {dk} {diag}" if dk else "") + " (expected [*S, in, r], [*S, r, out]" +
                (" and [*S, out]" if config.use_dora or config.lora_bias else "") +
                (" and [*S, r]" if dk else "") + ")"
            )
    return tokens


def _dropout_keys(rng: jax.Array | None, i: int, stack: tuple[int, ...]):
    if rng is None:
        return None
    k = jax.random.fold_in(rng, i)
    return jax.random.split(k, math.prod(stack)).reshape(stack) if stack else k


def _token_array(w: jax.Array, ids: tuple[int, ...], rows: jax.Array, strict: bool, name: str) -> LoraArray:
    """The table w [V, D] with rows `ids` replaced by `rows` [n, D], as the rank-n LoRA
    W0 + P^T (rows - W0[ids]) with P [n, V] the one-hot selection: a lookup gathers n numbers per
    token, a tied head adds an [n]-wide product, and no [V, D] copy is made."""
    w = jax.lax.stop_gradient(w)
    idx = jnp.asarray(ids)
    select = jax.nn.one_hot(idx, w.shape[0], dtype=rows.dtype).T  # [V, n]
    return LoraArray(w=w, a=select, b=rows - w[idx].astype(rows.dtype), key=None, m=None, mask=None, scale=1.0,
                     dropout=0.0, strict=strict, name=name)


def _lora_arrays(config, params, adapters, rng, strict, tokens, mask=None) -> PyTree:
    """params with each adapted leaf replaced by a LoraArray (W0 under stop_gradient)."""
    index = {p: i for i, p in enumerate(sorted(adapters))}
    biases = _bias_paths(adapters)

    def swap(path, w):
        if path in biases:  # lora_bias: y = x W + b0 + s * b_B, as the module adds its own bias
            kernel = biases[path]
            s = config.scale_for(kernel)
            return w + (s * adapters[kernel][LORA_BIAS].reshape(w.shape)).astype(w.dtype)
        if path not in adapters:
            return w
        ab = adapters[path]
        if TOKENS in ab:
            return _token_array(w, tokens[path], ab[TOKENS], strict, path)
        stack = ab["lora_A"].shape[:-2]
        a, b = bdlora.masked(config, path, ab["lora_A"], delta_b(ab))  # BD-LoRA: off-block zeros get no gradient
        return as_matrix(jax.lax.stop_gradient(w), *config.axes_for(path), lambda view: LoraArray(
            w=view, a=a, b=b,
            key=_dropout_keys(rng if config.dropout > 0 else None, index[path], stack),
            m=ab.get(MAGNITUDE), mask=None if mask is None else jnp.broadcast_to(mask, (*stack, *mask.shape)),
            scale=config.scale_for(path), dropout=config.dropout, strict=strict, name=path,
            velora=None if config.velora_num_groups is None else (config.velora_num_groups, float(config.velora_scale)),
            velora_v=None if velora.EMBED not in ab else jax.lax.stop_gradient(ab[velora.EMBED]),
        ))
    return tree.map_with_path(swap, params)


def apply(f: Callable[..., Any], config: LoraConfig, *, strategy: str = "factored",
          strict: bool = False) -> Callable[..., Any]:
    """Turn `f(params, *args, **kw)` into `g(params, adapters, *args, lora_rng=None, **kw)`.

    In `g`, each adapted weight W0 acts as W0 + s*A*B. `factored` keeps it lazy: a matmul with
    it computes x*W0 + s*((x*A)*B) and W0 gets no gradient; other uses materialise the sum
    (or raise `FallbackError` with `strict=True`). `merged` materialises every adapted weight
    first, then calls f (the reference; no dropout). `lora_rng` turns on dropout on the LoRA
    input (training); without it no dropout is applied. `params` may hold 4-bit weights from
    `quant.quantize` (QLoRA): adapted or not, they dequantize inside their own matmuls.
    `lora_mask` ([B, T] bools over the tokens of the adapted layers' inputs) limits the LoRA path
    to those tokens, the others computing exactly what the base model does; aLoRA configs
    (`alora_invocation_tokens`) need it: `alora_mask(config, input_ids)`. Every adapted layer
    must then see all T tokens: with `CausalLM.apply(..., positions=)` (as `generate`'s prefill
    passes it) also pass `trim_last_layer=False`.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown LoRA strategy {strategy!r}; expected one of {STRATEGIES}")

    @functools.wraps(f)
    def g(params, adapters, *args, lora_rng=None, lora_mask=None, **kwargs):
        tokens = _check(config, params, adapters)
        if lora_mask is None and config.alora_invocation_tokens is not None:
            raise ValueError("this config is aLoRA (alora_invocation_tokens): pass lora_mask=, the tokens the "
                             "adapter acts on, e.g. lora_jax.alora_mask(config, input_ids)")
        if lora_mask is not None:
            _check_mask(config, adapters, strategy)
            lora_mask = jnp.asarray(lora_mask, bool)
        if strategy == "merged":
            if lora_rng is not None and config.dropout > 0:
                raise ValueError("the merged strategy cannot apply LoRA dropout; use strategy='factored'")
            # BD-LoRA's off-block entries masked, as in the factored path (and then get no gradient)
            merged = _merge(scales(config, adapters), params, bdlora.mask_adapters(config, adapters), sign=1.0,
                            frozen=True, tokens=_token_items(tokens, adapters))
            return lift(f)(merged, *args, **kwargs)
        lazy = _lora_arrays(config, params, adapters, lora_rng, strict, tokens, lora_mask)
        return quaxify(f)(lazy, *args, **kwargs)

    return g


def _check_mask(config: LoraConfig, adapters: Adapters, strategy: str) -> None:
    """What a per-token LoRA cannot do: one merged weight, or changes that act on every token."""
    if strategy == "merged":
        raise ValueError("lora_mask applies the adapter on some tokens only: the merged strategy has one weight "
                         "for all; use strategy='factored'")
    every = [n for n, on in (("use_dora", config.use_dora), ("lora_bias", config.lora_bias),
                             ("trainable_tokens", any(TOKENS in ab for ab in adapters.values()))) if on]
    if every:
        raise ValueError(f"lora_mask applies the adapter on some tokens only, which {' and '.join(every)} cannot")


def alora_mask(config: LoraConfig, input_ids: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """aLoRA's tokens (PEFT's alora_offsets): [B, T] True from the start of the last occurrence of
    `config.alora_invocation_tokens` in each row of input_ids [B, T] to the row's end; all False in a
    row without it (the base model there). With `segment_ids` [B, T] (packed rows, `CausalLM.apply`'s),
    each sequence of a row is one such row of its own: its last invocation on, to its end. Jittable."""
    if config.alora_invocation_tokens is None:
        raise ValueError("alora_mask: the config has no alora_invocation_tokens")
    ids = jnp.asarray(input_ids)
    t, n = ids.shape[1], len(config.alora_invocation_tokens)
    if t < n:
        return jnp.zeros(ids.shape, bool)
    hit = jnp.ones((ids.shape[0], t - n + 1), bool)  # [B, T-n+1]: the invocation starts here
    for j, tok in enumerate(config.alora_invocation_tokens):
        hit &= ids[:, j : t - n + 1 + j] == tok
    if segment_ids is None:
        start = jnp.max(jnp.where(hit, jnp.arange(t - n + 1), -1), axis=1)  # [B]; -1: absent
        return (jnp.arange(t)[None, :] >= start[:, None]) & (start[:, None] >= 0)
    seg = jnp.asarray(segment_ids)
    for j in range(1, n):  # an invocation lies within one sequence
        hit &= seg[:, j : t - n + 1 + j] == seg[:, : t - n + 1]
    hit &= seg[:, : t - n + 1] > 0
    mine = hit[:, None, :] & (seg[:, :, None] == seg[:, None, : t - n + 1])  # [B, T, T-n+1]: in token t's sequence
    start = jnp.max(jnp.where(mine, jnp.arange(t - n + 1), -1), axis=2)  # [B, T]; -1: absent
    return (jnp.arange(t)[None, :] >= start) & (start >= 0)


def _bias_paths(adapters: Adapters) -> dict[str, str]:
    """{bias path: kernel path} for the adapters with a lora_B bias."""
    return {bias_path(p): p for p, ab in adapters.items() if LORA_BIAS in ab}


def _token_items(tokens: Mapping[str, tuple[int, ...]], adapters: Adapters) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """((table, ids), ...) of the trainable_tokens adapters present: hashable, for the jitted merge."""
    return tuple(sorted((p, ids) for p, ids in tokens.items() if p in adapters))


def _merge(scales, params, adapters, *, sign: float, frozen: bool = False, tokens=()):
    scales, tokens = dict(scales), dict(tokens)
    biases = _bias_paths(adapters)

    def fold(path, w):
        if path in biases:  # lora_bias folds into the module's bias, as PEFT's merge does
            kernel = biases[path]
            return (w + sign * scales[kernel] * adapters[kernel][LORA_BIAS].reshape(w.shape)).astype(w.dtype)
        if path not in adapters:
            return w
        if path in tokens:  # PEFT's index_copy: the chosen rows are the trained ones, exactly
            w0 = jax.lax.stop_gradient(w) if frozen else w
            return w0.at[jnp.asarray(tokens[path])].set(adapters[path][TOKENS].astype(w.dtype))
        ab, w = adapters[path], dense(w)  # a quantized W0 (apply's merged strategy) merges into its dense dtype
        delta = jnp.einsum("...ir,...ro->...io", ab["lora_A"], delta_b(ab)) * scales[path]  # [*S, in, out]
        w0 = (jax.lax.stop_gradient(w) if frozen else w).reshape(delta.shape)  # [*S, *I, *O] -> its matrix
        merged = (w0 + sign * delta).astype(w.dtype)
        return (merged if MAGNITUDE not in ab else dora_weight(merged, ab[MAGNITUDE])).reshape(w.shape)
    return tree.map_with_path(fold, params)


def scales(config: LoraConfig, adapters: Mapping[str, Any]) -> tuple[tuple[str, float], ...]:
    """((path, s), ...) for every adapter: the hashable per-path scales."""
    return tuple((p, config.scale_for(p)) for p in sorted(adapters))


@functools.partial(jax.jit, static_argnums=(0, 3, 4), donate_argnums=1)
def _merge_jit(scale_items, params, adapters, sign, tokens):
    return _merge(scale_items, params, adapters, sign=sign, tokens=tokens)


def merge(config: LoraConfig, params: PyTree, adapters: Adapters, *, requantize: bool = False) -> PyTree:
    """params with W0 + s*A*B folded in (jitted; `params` is donated, do not reuse it). A quantized
    weight (`quant.QuantizedArray`, NF4 or int8) that is adapted comes back dense, in its compute
    dtype; with `requantize=True` quantized again as it was (scheme, block size, double
    quantization), as PEFT's `merge_and_unload` of a bitsandbytes 4- or 8-bit model leaves it."""
    if config.alora_invocation_tokens is not None:
        raise ValueError("an aLoRA adapter (alora_invocation_tokens) acts on some tokens only: it cannot be merged "
                         "into the weights (nor can PEFT merge it)")
    tokens = _check(config, params, adapters)
    was = {p: w for p, w in tree.flatten(params).items() if p in adapters and isinstance(w, quant.QuantizedArray)} \
        if requantize else {}
    # A quantized weight merges into its dense compute dtype: dequantize it here, so the donated
    # buffer is the dense one the merged weight can reuse. One to be requantized stays fp32 until it
    # is: PEFT adds the fp32 delta to bitsandbytes' dequantized weight and quantizes that sum.
    f32 = lambda w: (dense(w) if w.scheme == "nf4" else dense(w.astype(jnp.float32))).astype(jnp.float32)  # noqa: E731
    params = tree.map_with_path(lambda p, w: (f32(w) if p in was else dense(w)) if p in adapters else w, params)
    merged = _merge_jit(scales(config, adapters), params, bdlora.mask_adapters(config, adapters), 1.0,
                        _token_items(tokens, adapters))
    return tree.map_with_path(lambda p, w: quant.requantize(w, was[p]) if p in was else w, merged) if was else merged


def unmerge(config: LoraConfig, params: PyTree, adapters: Adapters) -> PyTree:
    """Inverse of `merge`: W - s*A*B (jitted; `params` is donated). Not for DoRA."""
    if config.use_dora:
        # A DoRA-merged column has norm m: ||W0 + s*A*B||, which undoing it needs, is gone.
        raise ValueError("unmerge cannot undo a DoRA merge (the merged weight no longer holds "
                         "||W0 + s*A*B||); keep a copy of the base params instead")
    if any(TOKENS in ab for ab in adapters.values()):
        raise ValueError("unmerge cannot restore the embedding rows that trainable_tokens replaced; keep a copy "
                         "of the base params instead")
    check_adapters(config, params, adapters)
    return _merge_jit(scales(config, adapters), params, bdlora.mask_adapters(config, adapters), -1.0, ())


def trainable_mask(config: LoraConfig, params: PyTree) -> PyTree:
    """Bool tree over params: the leaves that train in full (bias policy + `trainable`)."""
    targets = target_paths(config, params)
    modules = {p.rsplit("/", 1)[0] for p in targets}

    def trains(path, _):
        parent, _, leaf = path.rpartition("/")
        if config.trainable is not None and tree.matches(config.trainable, path):
            return True
        if leaf == "bias":
            return config.bias == "all" or (config.bias == "lora_only" and parent in modules)
        return False
    return tree.map_with_path(trains, params)


@dataclasses.dataclass(frozen=True)
class Summary:
    """Trainable vs total parameter counts, like PEFT's print_trainable_parameters."""

    trainable: int
    total: int
    per_target: dict[str, int]

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        lines = [f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                 f"trainable%: {self.percent:.4f}"]
        lines += [f"  {name}: {n:,}" for name, n in self.per_target.items()]
        return "\n".join(lines)


def summary(config: LoraConfig, params: PyTree, adapters: Adapters) -> Summary:
    """Count trainable (adapters + extra trainable leaves) and total (frozen + adapters) params; MiCA's
    fixed lora_B counts in the total only, as in PEFT."""
    extras, _ = tree.partition(params, trainable_mask(config, params))
    per: dict[str, int] = {}
    flat, n_adapters, n_fixed = tree.flatten(params), 0, 0
    for p, ab in adapters.items():
        name = p.split("/")[-2] if "/" in p else p  # the module name, e.g. c_attn
        n = tree.count(ab)
        gate = layer_gate(config, p, flat[p].shape) if TOKENS not in ab else None
        if gate is not None:  # the stack's other layers hold zeros that never train
            n = n * int(gate.sum()) // gate.size
        if config.init == MICA and "lora_B" in ab:
            fixed = n * ab["lora_B"].size // tree.count(ab)
            n, n_fixed = n - fixed, n_fixed + fixed
        if velora.EMBED in ab:  # a buffer in PEFT: counted in neither
            n -= ab[velora.EMBED].size
        if "lora_A" in ab:  # BD-LoRA's masked zeros: PEFT holds the blocks alone
            off = bdlora.off_block_count(config, p, ab["lora_A"].shape, ab["lora_B"].shape)
            n -= off if gate is None else off * int(gate.sum()) // gate.size
        per[name] = per.get(name, 0) + n
        n_adapters += n
    n_extra = tree.count(extras)
    if n_extra:
        per["full (bias / trainable)"] = n_extra
    return Summary(trainable=n_adapters + n_extra, total=tree.count(params) + n_adapters + n_fixed, per_target=per)
