"""Pieces shared by the GPT-2 and BLOOM models.

* `BaseConfig`: frozen config dataclass (architecture read from a Hugging Face `config.json`,
  plus runtime options: parameter/compute dtype, scanned or unrolled layers, remat).
* `attention`: `jax.nn.dot_product_attention`, cuDNN on GPU in bf16/fp16, XLA elsewhere.
* `attention_inputs`: positions and the causal + padding mask, with or without a KV cache.
* `run_layers`: the decoder stack, scanned (`transformer/h/...` stacked [L, ...]) or unrolled
  (`transformer/h/{i}/...`), optionally rematerialised.
* `CausalLM`: the model object with a pure `apply(params, input_ids, attention_mask, ...)`.
* `SequenceClassifier`: the same decoder with HF's `score` head on each row's last real token.

Parameters are plain nested dicts rooted at `transformer`, mirroring Hugging Face module names.
Every weight matrix is a `kernel` [in, out] used only as the right operand of a matmul, so a LoRA
transform that intercepts `dot_general` sees it untouched.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Params = dict[str, Any]
Cache = dict[str, jax.Array]

_MISSING = object()


def hf_get(hf: Mapping[str, Any], *names: str, default: Any = _MISSING) -> Any:
    """First of `names` present in the HF config dict (HF configs use several aliases)."""
    for name in names:
        if name in hf and hf[name] is not None:
            return hf[name]
    if default is _MISSING:
        raise ValueError(f"config.json has none of the fields {names}")
    return default


@dataclasses.dataclass(frozen=True, kw_only=True)
class BaseConfig:
    """Architecture (from HF `config.json`) plus runtime options. Frozen and hashable, so it
    can be a static argument to `jax.jit`."""

    model_type: ClassVar[str] = ""
    # HF checkpoint layout, used by the key map in `hf.py`.
    embed_name: ClassVar[str] = ""  # the tied embedding / LM head module
    embedding_modules: ClassVar[tuple[str, ...]] = ()
    layernorm_modules: ClassVar[tuple[str, ...]] = ()
    linear_modules: ClassVar[tuple[str, ...]] = ()
    hf_transpose_linear: ClassVar[bool] = False  # torch Linear stores (out, in)
    hf_ignored_keys: ClassVar[str] = r"lm_head\.weight"  # regex; buffers and the tied head
    hf_architecture: ClassVar[str] = ""
    # {head module: the architecture of the same body with that head}: score, qa_outputs, classifier
    hf_head_architectures: ClassVar[Mapping[str, str]] = {}

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    layer_norm_epsilon: float = 1e-5
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None  # a config.json may list several
    pad_token_id: int | None = None
    # Runtime options (not part of the HF config).
    param_dtype: Any = jnp.float32
    compute_dtype: Any = None  # None: same as param_dtype
    scan_layers: bool = False
    remat: bool = False
    remat_policy: str | None = None  # a name in jax.checkpoint_policies, e.g. "dots_saveable"
    attention_impl: str = "auto"  # "auto" (cuDNN on GPU in bf16/fp16, else XLA), "xla", "cudnn"
    # The original HF config dict, kept for export; excluded from eq/hash.
    hf_config: Mapping[str, Any] = dataclasses.field(
        default_factory=dict, compare=False, hash=False, repr=False
    )

    def __post_init__(self) -> None:
        # Normalise dtypes so that configs built with jnp.float32 or "float32" compare equal.
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
        if isinstance(self.eos_token_id, Sequence):  # hashable (jit's static model), as generate takes it
            object.__setattr__(self, "eos_token_id", tuple(int(e) for e in self.eos_token_id) or None)
        if self.compute_dtype is not None:
            object.__setattr__(self, "compute_dtype", jnp.dtype(self.compute_dtype))
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by {self.num_heads} heads")
        if self.attention_impl not in ("auto", "xla", "cudnn"):
            raise ValueError(f"attention_impl must be auto, xla or cudnn, got {self.attention_impl!r}")
        if self.remat_policy is not None and not hasattr(jax.checkpoint_policies, self.remat_policy):
            raise ValueError(f"unknown remat_policy {self.remat_policy!r} (see jax.checkpoint_policies)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def dtype(self) -> jnp.dtype:
        """Compute dtype of activations."""
        return self.compute_dtype if self.compute_dtype is not None else self.param_dtype

    def replace(self, **changes: Any) -> BaseConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides: Any) -> BaseConfig:
        """Build from a HF `config.json` dict; `overrides` set runtime options or fields."""
        if hf.get("model_type", cls.model_type) != cls.model_type:
            raise ValueError(f"{cls.__name__} got model_type {hf.get('model_type')!r}")
        fields = cls._fields_from_hf(hf)
        fields.update(overrides)
        return cls(hf_config=copy.deepcopy(dict(hf)), **fields)

    @classmethod
    def _fields_from_hf(cls, hf: Mapping[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _hf_fields(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict transformers can load: the original one, with our fields."""
        out = copy.deepcopy(dict(self.hf_config))
        out.update(self._hf_fields())
        out["model_type"] = self.model_type
        out.setdefault("architectures", [self.hf_architecture])
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        out.update(bos_token_id=self.bos_token_id, eos_token_id=eos)
        if self.pad_token_id is not None:
            out["pad_token_id"] = self.pad_token_id
        out["tie_word_embeddings"] = True
        # transformers loads in the config's dtype: say what the exported tensors are.
        out["dtype"] = str(self.param_dtype)
        if "torch_dtype" in out:
            out["torch_dtype"] = str(self.param_dtype)
        return out

    def make_module(self, deterministic: bool) -> nn.Module:
        """The linen module computing hidden states (params rooted below `transformer`)."""
        raise NotImplementedError


# ----------------------------------------------------------------------------- layers


def dense(cfg: BaseConfig, features: int, name: str) -> nn.Dense:
    """A Linear/Conv1D: `x @ kernel + bias`, kernel [in, out] (flax Dense is a plain dot_general)."""
    return nn.Dense(
        features,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=nn.initializers.normal(0.02),
        name=name,
    )


def layer_norm(cfg: BaseConfig, name: str) -> nn.LayerNorm:
    # Two-pass variance, as torch does: E[x^2] - E[x]^2 loses digits on large activations.
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_epsilon,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        use_fast_variance=False,
        name=name,
    )


def embed(cfg: BaseConfig, num: int, name: str) -> nn.Embed:
    # dtype=param_dtype: gather in storage dtype, cast only the gathered rows afterwards
    # (nn.Embed would otherwise cast the whole table; BLOOM's is 250,880 x D).
    return nn.Embed(
        num,
        cfg.hidden_size,
        dtype=cfg.param_dtype,
        param_dtype=cfg.param_dtype,
        embedding_init=nn.initializers.normal(0.02),
        name=name,
    )


def concrete(x: Any) -> np.ndarray | None:
    """x as a numpy array where its values are known (outside jit), else None (a tracer): for
    checks that can only run on concrete inputs."""
    return None if isinstance(x, jax.core.Tracer) else np.asarray(x)


def longest_row(attention_mask: jax.Array) -> int | None:
    """The most real tokens in a row of a concrete mask [B, T] (positions count only those, so left
    padding takes none); None under jit, where the mask is not known."""
    m = concrete(attention_mask)
    return None if m is None else int((m > 0).sum(axis=1).max())


def right_padded_row(attention_mask: jax.Array) -> int | None:
    """The first row of a concrete mask [B, T] that holds a real token and ends in padding; None
    where there is none, and under jit, where the mask is not known."""
    m = concrete(attention_mask)
    if m is None:
        return None
    rows = np.flatnonzero((m > 0).any(axis=1) & (m[:, -1] <= 0))
    return int(rows[0]) if rows.size else None


class AttnContext(NamedTuple):
    """What every layer needs besides its input; arrays only, so it can go through nn.scan."""

    mask: jax.Array | None  # [B, 1, T, S] bool (causal & padding); None = causal only (T == S)
    bias: jax.Array | None  # [B|1, H, 1, S] additive (ALiBi) or None
    index: jax.Array | None  # int32 scalar: cache slot of the first new token; None = no cache
    # [B, K] indices of the tokens whose output the caller keeps (`CausalLM.apply`'s positions):
    # the last layer runs attention for those queries and its output and MLP on those rows only
    # (its QKV projection, keys and values on all T).
    queries: jax.Array | None = None


def take_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
    """x [B, T, ...] at token indices rows [B, K] -> [B, K, ...]."""
    return jnp.take_along_axis(x, rows.reshape(rows.shape + (1,) * (x.ndim - 2)), axis=1)


class AttnInputs(NamedTuple):
    positions: jax.Array  # [B, T] position ids of the new tokens (pads get 0)
    key_positions: jax.Array  # [B|1, S] position ids of all keys (pads get 0)
    mask: jax.Array | None  # [B, 1, T, S] bool or None
    key_mask: jax.Array | None  # [B, S] int32, the new cache mask (None without cache)
    index: jax.Array | None


def attention_inputs(
    attention_mask: jax.Array | None, cache: Cache | None, batch: int, length: int,
    segment_ids: jax.Array | None = None,
) -> AttnInputs:
    """Positions and the causal + padding mask for `length` new tokens.

    Position ids count real tokens only (`cumsum(mask) - 1`, pads 0), as HF `generate` does, so
    a left-padded row gives the same logits as the unpadded one. With `segment_ids` [B, T] (packed
    rows: sequences 1, 2, ... side by side, 0 for padding) a token sees the earlier tokens of its
    own sequence alone, and positions restart at each sequence, so every sequence gets the logits
    it would get in a row of its own.
    """
    if segment_ids is not None:
        return _segment_inputs(segment_ids.astype(jnp.int32))
    if cache is None and attention_mask is None:
        pos = jnp.arange(length, dtype=jnp.int32)[None, :]  # [1, T]
        return AttnInputs(jnp.broadcast_to(pos, (batch, length)), pos, None, None, None)
    new = (
        jnp.ones((batch, length), jnp.int32)
        if attention_mask is None
        else attention_mask.astype(jnp.int32)
    )
    if cache is None:
        index, key_mask = jnp.int32(0), new  # [B, S=T]
    else:
        index = cache["index"]
        key_mask = jax.lax.dynamic_update_slice(cache["mask"], new, (0, index))  # [B, S]
    key_pos = (jnp.cumsum(key_mask, axis=1) - 1) * key_mask  # [B, S]
    positions = jax.lax.dynamic_slice_in_dim(key_pos, index, length, axis=1)  # [B, T]
    q_idx = index + jnp.arange(length)[:, None]  # [T, 1] absolute slot of each query
    k_idx = jnp.arange(key_mask.shape[1])[None, :]  # [1, S]
    # A query sees earlier real keys, and always itself: a pad query with no real key before it
    # would otherwise get an all-masked row (NaN in cuDNN).
    mask = (k_idx <= q_idx) & ((key_mask[:, None, :] > 0) | (k_idx == q_idx))  # [B, T, S]
    return AttnInputs(
        positions, key_pos, mask[:, None], key_mask if cache is not None else None,
        index if cache is not None else None,
    )


def _segment_inputs(seg: jax.Array) -> AttnInputs:
    """`attention_inputs` of packed rows, segment ids seg [B, T] (each sequence one contiguous run)."""
    idx = jnp.arange(seg.shape[1], dtype=jnp.int32)  # [T]
    starts = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)  # [B, T]
    first = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)  # [B, T] where each token's run begins
    positions = (idx - first) * (seg > 0)  # [B, T], pads 0
    same = seg[:, :, None] == seg[:, None, :]  # [B, T, S=T]
    # A pad sees itself alone (never an all-masked row), a real token its own sequence's earlier tokens.
    mask = (idx[:, None] >= idx[None, :]) & same & ((seg[:, None, :] > 0) | (idx[:, None] == idx[None, :]))
    return AttnInputs(positions, positions, mask[:, None], None, None)


@functools.cache
def _compute_capability() -> float | None:
    cc = getattr(jax.devices()[0], "compute_capability", None)
    try:
        return None if cc is None else float(cc)
    except (TypeError, ValueError):
        return None


def _cudnn_capable() -> bool:
    """cuDNN fused attention needs compute capability >= 8.0 (Ampere); a T4 (7.5) gets XLA."""
    cc = _compute_capability()
    return cc is None or cc >= 8.0


def _cudnn_head_dim_max() -> int:
    """jax's cuDNN attention takes head dims up to 256 from Hopper (9.0) on, else 128."""
    cc = _compute_capability()
    return 256 if cc is not None and cc >= 9.0 else 128


def _attention_impl(cfg: BaseConfig, dtype: jnp.dtype, T: int, S: int, ctx: AttnContext) -> str:
    """cuDNN flash attention where it applies (GPU, bf16/fp16, head dim a multiple of 8 and, with
    the FOLD_DIMS a bias adds, at most 128, or 256 from Hopper on; even lengths when there is a
    bias or mask), else XLA. Cached decoding uses XLA: one query per step is memory-bound, and
    cuDNN's fused kernels target training shapes. A layer that keeps only some queries uses XLA
    too, whatever `attention_impl` says (its K queries against S keys take a mask of their own)."""
    if ctx.queries is not None:  # a few queries (the loss's rows) against all keys: a small product
        return "xla"
    if cfg.attention_impl != "auto":
        return cfg.attention_impl
    biased = ctx.bias is not None or ctx.mask is not None
    cudnn_ok = (
        jax.default_backend() == "gpu"
        and _cudnn_capable()
        and dtype in (jnp.bfloat16, jnp.float16)
        and cfg.head_dim % 8 == 0
        and cfg.head_dim + (FOLD_DIMS if ctx.bias is not None else 0) <= _cudnn_head_dim_max()
        and ctx.index is None
        and not (biased and (T % 2 or S % 2))
    )
    return "cudnn" if cudnn_ok else "xla"


def attention(
    cfg: BaseConfig,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    ctx: AttnContext,
    scale: float | None = None,
) -> jax.Array:
    """Multi-head attention. q [B, T, H, D], k/v [B, S, H, D] -> [B, T, H, D]; with
    `ctx.queries` [B, K] q holds those K tokens only (q [B, K, H, D] -> [B, K, H, D])."""
    T, S, D = q.shape[1], k.shape[1], q.shape[-1]
    impl = _attention_impl(cfg, q.dtype, T, S, ctx)
    bias, fold, mask = ctx.bias, ctx.bias is not None and impl == "cudnn", ctx.mask
    if ctx.queries is not None:  # the kept queries' rows of the mask; causal by their token index
        rows = ctx.queries[:, None, :, None]  # [B, 1, K, 1]
        mask = rows >= jnp.arange(S) if mask is None else jnp.take_along_axis(mask, rows, axis=2)  # [B, 1, K, S]
    if fold:
        # A bias given to cuDNN is a [B, H, T, S] tensor in HBM, and jax's cuDNN attention also
        # computes its gradient; a per-key bias (ALiBi) folds into the dot products instead.
        scale = D ** -0.5 if scale is None else scale
        q, k, v = fold_key_bias(q, k, v, bias, scale)  # [..., D + FOLD_DIMS]
        bias = None
    # Without a cache T == S and the causal flag is exact (the mask, if any, is a subset of it);
    # it lets cuDNN skip the masked blocks. With a cache the mask alone carries causality.
    out = jax.nn.dot_product_attention(
        q, k, v, bias=bias, mask=mask, scale=scale,
        is_causal=ctx.index is None and ctx.queries is None, implementation=impl,
    )
    return out[..., :D] if fold else out  # [B, T, H, D]


FOLD_DIMS = 8  # cuDNN takes head dims in multiples of 8; the fold uses 2 of them


def fold_key_bias(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array,
                  scale: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q [B, T, H, D], k/v [B, S, H, D] and a per-key bias [B|1, H, 1, S] -> q, k, v
    [..., D + FOLD_DIMS] whose attention at `scale` equals the biased one.

    x = bias / scale is split as r * (hi + lo): r a power of two near sqrt(max |x|) over each
    row's and head's keys (a reduction over S alone, so no collective when the batch is sharded),
    so that neither factor overflows fp16, and hi, lo the high and low parts of x / r in k's dtype
    (their sum holds it to about 2^-16 of its size, closer than the bias itself in bf16). q gains
    (r, r), k (hi, lo), v zeros: the output's last FOLD_DIMS columns are zero, and the extra
    columns get no gradient back (the bias is a constant)."""
    B, S, H, D = k.shape
    if bias.ndim != 4 or bias.shape[2] != 1 or bias.shape[1] != H or bias.shape[3] != S:
        raise ValueError(f"fold_key_bias takes a per-key bias [B|1, {H}, 1, {S}], got {bias.shape}")
    x = jax.lax.stop_gradient(jnp.swapaxes(bias[:, :, 0, :].astype(jnp.float32), 1, 2) / scale)  # [B|1, S, H]
    r = jnp.exp2(jnp.ceil(0.5 * jnp.log2(jnp.maximum(jnp.max(jnp.abs(x), axis=1, keepdims=True), 1.0))))
    x = x / r  # r: [B|1, 1, H], powers of two
    hi = x.astype(k.dtype)
    lo = (x - hi.astype(jnp.float32)).astype(k.dtype)
    kx = jnp.broadcast_to(jnp.stack([hi, lo], -1), (B, S, H, 2))  # [B, S, H, 2]
    qx = jnp.broadcast_to(r[..., None].astype(q.dtype), q.shape[:3] + (2,))  # [B, T, H, 2]
    zeros = lambda t: jnp.zeros(t.shape[:3] + (FOLD_DIMS - 2,), t.dtype)  # noqa: E731
    q = jnp.concatenate([q, qx, zeros(q)], -1)
    k = jnp.concatenate([k, kx, zeros(k)], -1)
    v = jnp.concatenate([v, jnp.zeros(v.shape[:3] + (FOLD_DIMS,), v.dtype)], -1)
    return q, k, v


def update_kv(
    kv: tuple[jax.Array, jax.Array] | None, k: jax.Array, v: jax.Array, index: jax.Array | None
) -> tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Write new k/v [B, T, H, D] into a layer's cache [B, S, H, D] at `index`; returns the keys
    and values to attend to and the new layer cache (None without cache)."""
    if kv is None:
        return k, v, None
    ck = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, index, 0, 0))
    cv = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, index, 0, 0))
    return ck, cv, (ck, cv)


class _Unrolled(nn.Module):
    """Layers as separate submodules `0 .. L-1` (params `h/{i}/...`)."""

    block: Any
    config: BaseConfig
    deterministic: bool

    @nn.compact
    def __call__(self, x, kv, ctx):
        last = self.config.num_layers - 1
        for i in range(self.config.num_layers):
            layer_kv = None if kv is None else (kv[0][i], kv[1][i])  # [B, S, H, D]
            layer_ctx = ctx if i == last else ctx._replace(queries=None)  # only the last trims its rows
            x, new = self.block(self.config, self.deterministic, name=str(i))(x, layer_kv, layer_ctx)
            if kv is not None:
                # Write back slice by slice (an in-place update for XLA) rather than re-stacking
                # the whole [L, B, S, H, D] cache every decoding step.
                kv = (kv[0].at[i].set(new[0]), kv[1].at[i].set(new[1]))
        return x, kv


def run_layers(
    block: type[nn.Module],
    cfg: BaseConfig,
    deterministic: bool,
    x: jax.Array,
    kv: tuple[jax.Array, jax.Array] | None,
    ctx: AttnContext,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Run the decoder stack as submodule `h` of the calling compact module.

    `block(config, deterministic)` maps `(x, layer_kv, ctx) -> (x, new_layer_kv)`, x [B, T, D]
    -> [B, K, D] when `ctx.queries` [B, K] is set. kv: cache keys/values [L, B, S, H, D] or None.
    Returns x [B, K, D] at `ctx.queries` if set, else [B, T, D]: unrolled, the last layer runs
    attention for those queries and its output and MLP on those rows alone; scanned (one body for
    every layer), all rows run and the kept ones are taken at the end.
    """
    if cfg.remat:
        policy = getattr(jax.checkpoint_policies, cfg.remat_policy) if cfg.remat_policy else None
        # prevent_cse is only needed outside scan (scan already stops CSE across iterations).
        block = nn.remat(block, policy=policy, prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
        scanned = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(0, nn.broadcast),
            length=cfg.num_layers,
        )
        x, kv = scanned(cfg, deterministic, name="h")(x, kv, ctx._replace(queries=None))
        return (x if ctx.queries is None else take_rows(x, ctx.queries)), kv
    if cfg.num_layers == 0 and ctx.queries is not None:
        x = take_rows(x, ctx.queries)  # [B, K, D]
    return _Unrolled(block, cfg, deterministic, name="h")(x, kv, ctx)


# ----------------------------------------------------------------------------- layouts


def is_scanned(params: Params) -> bool:
    """Whether the layers are stacked ([L, ...] leaves under `transformer/h`)."""
    return not all(k.isdigit() for k in params["transformer"]["h"])


def stack_layers(params: Params) -> Params:
    """Unrolled `transformer/h/{i}/...` -> scanned `transformer/h/...` with leaves [L, ...]."""
    if is_scanned(params):
        return params
    h = params["transformer"]["h"]
    layers = [h[str(i)] for i in range(len(h))]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return {**params, "transformer": {**params["transformer"], "h": stacked}}


def unstack_layers(params: Params) -> Params:
    """Scanned `transformer/h/...` [L, ...] -> unrolled `transformer/h/{i}/...`."""
    if not is_scanned(params):
        return params
    h = params["transformer"]["h"]
    num = jax.tree.leaves(h)[0].shape[0]
    layers = {str(i): jax.tree.map(lambda x, i=i: x[i], h) for i in range(num)}
    return {**params, "transformer": {**params["transformer"], "h": layers}}


# ----------------------------------------------------------------------------- model


@dataclasses.dataclass(frozen=True)
class CausalLM:
    """A decoder-only LM: a config plus pure functions of a param tree.

    `jax.jit(model.apply, static_argnames=("return_hidden", "deterministic"))` when those flags
    are passed; with the defaults `jax.jit(model.apply)` works as is.
    """

    config: BaseConfig

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def apply(
        self,
        params: Params,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        cache: Cache | None = None,
        return_hidden: bool = False,
        positions: jax.Array | None = None,
        deterministic: bool = True,
        rng: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        vocab_multiple: int = 1,
        trim_last_layer: bool = True,
    ) -> jax.Array | tuple[jax.Array, Cache]:
        """Forward pass.

        Args:
          params: `{"transformer": ...}` param tree.
          input_ids: [B, T] int tokens.
          attention_mask: [B, T] 1 for real tokens, 0 for (left) padding. With a cache it covers
            the T new tokens only; the cache remembers earlier ones.
          cache: from `init_cache`; the new tokens are written at `cache["index"]`.
          return_hidden: return final layer-normed hidden states [B, T, D] instead of logits.
          positions: [B, K] int indices into the T tokens: the output only there ([B, K, V] or
            [B, K, D]). The LM head then runs on K rows per sequence, not T, and, since it runs
            inside `apply`, a LoRA wrapper adapts it with the tied embedding. With K < T and
            unrolled layers the last layer, too, runs attention for those K queries and its output
            projection and MLP on those K rows (its QKV projection and the cache on all T):
            nothing there reaches other rows.
          deterministic: False enables dropout (needs `rng`); attention dropout is not applied.
          rng: PRNG key for dropout.
          segment_ids: [B, T] int, instead of `attention_mask`, for packed rows: several sequences
            one after another in a row, numbered 1, 2, ... (each a contiguous run), 0 for padding.
            Each sequence attends to itself alone, with positions from 0, so its logits are those
            of its own row. Not with a cache.
          vocab_multiple: pad the logits' last axis to a multiple of this, the extra columns
            -inf (see `logits`): for a training loss, which they leave unchanged.
          trim_last_layer: False runs the last layer on all T rows before taking `positions`,
            for a per-token input of the wrapped layers that spans all T (aLoRA's `lora_mask`).
        Returns:
          logits [B, T, V] in the compute dtype (or hidden), and the new cache if one was given.
        """
        if not deterministic and rng is None:
            raise ValueError("deterministic=False needs an rng for dropout")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            # With a cache the mask covers the new tokens only (not HF's full-length mask).
            raise ValueError(
                f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}"
            )
        if segment_ids is not None:
            if attention_mask is not None or cache is not None:
                raise ValueError("segment_ids replaces attention_mask (0 marks padding) and takes no cache")
            if segment_ids.shape != input_ids.shape:
                raise ValueError(f"segment_ids shape {segment_ids.shape} != input_ids shape {input_ids.shape}")
        ids = concrete(input_ids)  # out-of-vocabulary ids would read NaN rows (jnp.take fills), where torch raises
        if ids is not None and ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            bad = ids.min() if ids.min() < 0 else ids.max()
            raise ValueError(f"token id {bad} is outside the vocabulary of {self.config.vocab_size} tokens")
        rngs = None if deterministic else {"dropout": rng}
        trim = positions is not None and trim_last_layer and positions.shape[1] < input_ids.shape[1]
        hidden, new_cache = self.config.make_module(deterministic).apply(
            {"params": params["transformer"]}, input_ids, attention_mask, cache, segment_ids,
            positions if trim else None, rngs=rngs,
        )  # [B, K, D] when trimmed, else [B, T, D]
        if positions is not None and not trim:
            hidden = take_rows(hidden, positions)  # [B, K, D]
        out = hidden if return_hidden else self.logits(params, hidden, vocab_multiple)
        return out if cache is None else (out, new_cache)

    def logits(self, params: Params, hidden: jax.Array, vocab_multiple: int = 1) -> jax.Array:
        """Tied LM head: hidden [..., D] -> logits [..., V] (in hidden's dtype).

        `vocab_multiple` > 1 pads the vocabulary axis to a multiple of it with -inf logits, which
        a softmax or log-sum-exp gives zero weight: GPT-2's 50,257 rows leave every [.., V] row
        misaligned, and on an H100 its head's backward matmul ran at under half the rate of the
        forward one (benchmarks/RESULTS.md). An adapted table stays factored (`lazy`'s pad rule)."""
        table = params["transformer"][self.config.embed_name]["embedding"]  # [V, D]
        if vocab_multiple < 1:
            raise ValueError(f"vocab_multiple must be >= 1, got {vocab_multiple}")
        V = table.shape[0]
        pad = -V % vocab_multiple
        table = table.astype(hidden.dtype)  # before padding: an fp32 table is copied once, in the compute dtype
        if pad:
            table = jnp.pad(table, ((0, pad), (0, 0)))  # [V + pad, D]
        out = jnp.einsum("...d,vd->...v", hidden, table)  # [..., V + pad]
        return out if not pad else jnp.where(jnp.arange(V + pad) < V, out, -jnp.inf)  # stays in out's dtype

    def init_params(self, key: jax.Array, dtype: Any = None) -> Params:
        """Random params (HF-style normal(0.02) init) in the configured layout and dtype."""
        cfg = self.config if dtype is None else self.config.replace(param_dtype=dtype)
        ids = jnp.zeros((1, 1), jnp.int32)
        variables = jax.jit(cfg.make_module(True).init)(key, ids, None, None)
        return {"transformer": variables["params"]}

    def param_shapes(self) -> Params:
        """`jax.ShapeDtypeStruct` tree of the params, without allocating them."""
        return jax.eval_shape(self.init_params, jax.random.key(0))

    def init_cache(self, batch_size: int, max_length: int) -> Cache:
        """Empty KV cache: k/v [L, B, S, H, D] in the compute dtype, key mask [B, S], index."""
        cfg = self.config
        shape = (cfg.num_layers, batch_size, max_length, cfg.num_heads, cfg.head_dim)
        return {
            "k": jnp.zeros(shape, cfg.dtype),
            "v": jnp.zeros(shape, cfg.dtype),
            "mask": jnp.zeros((batch_size, max_length), jnp.int32),
            "index": jnp.int32(0),
        }

    @staticmethod
    def cache_rows(cache: Cache, rows: jax.Array) -> Cache:
        """The cache of the sequences `rows` [B'] (indices into its batch, repeats allowed): how
        beam search follows each beam's history."""
        return {
            "k": jnp.take(cache["k"], rows, axis=1),  # [L, B', S, H, D]
            "v": jnp.take(cache["v"], rows, axis=1),
            "mask": jnp.take(cache["mask"], rows, axis=0),  # [B', S]
            "index": cache["index"],
        }


SCORE = "score"  # HF's sequence-classification head: Linear(hidden, num_labels, bias=False)


def last_token_index(input_ids: jax.Array, attention_mask: jax.Array | None, pad_token_id: int | None) -> jax.Array:
    """[B] index of each row's last real token: the last 1 of `attention_mask`; without a mask,
    the last token that is not `pad_token_id` (HF's pooling); without either, the last position."""
    if attention_mask is not None:
        real = attention_mask.astype(jnp.int32)
    elif pad_token_id is not None:
        real = (input_ids != pad_token_id).astype(jnp.int32)
    else:
        real = jnp.ones(input_ids.shape, jnp.int32)
    return jnp.argmax(jnp.arange(input_ids.shape[1]) * real, axis=-1)  # [B]


def head_kernel(config: BaseConfig, features: int, key: jax.Array, dtype: Any = None) -> jax.Array:
    """A new task head's weight [D, features], as transformers initialises a Linear: N(0,
    initializer_range = 0.02 unless the HF config says otherwise), in `dtype` (default param_dtype)."""
    std = float(config.hf_config.get("initializer_range") or 0.02)
    kernel = std * jax.random.normal(key, (config.hidden_size, features), jnp.float32)
    return kernel.astype(config.param_dtype if dtype is None else dtype)


class WithHead:
    """The params of a decoder with a task head: the model's `config` and `init_head(key, dtype)`."""

    config: BaseConfig

    def init_head(self, key: jax.Array, dtype: Any = None) -> Params:
        raise NotImplementedError

    def init_params(self, key: jax.Array, dtype: Any = None) -> Params:
        """Random decoder params (`CausalLM.init_params`) plus a new head."""
        body_key, head_key = jax.random.split(key)
        return CausalLM(self.config).init_params(body_key, dtype) | self.init_head(head_key, dtype)

    def param_shapes(self) -> Params:
        """`jax.ShapeDtypeStruct` tree of the params, without allocating them."""
        return jax.eval_shape(self.init_params, jax.random.key(0))


@dataclasses.dataclass(frozen=True)
class SequenceClassifier(WithHead):
    """A decoder with Hugging Face's sequence-classification head (`GPT2ForSequenceClassification`,
    `BloomForSequenceClassification`): logits = h_last @ score, where h_last is the final hidden
    state of each row's last real token and `score/kernel` [D, num_labels] has no bias. The row's
    last real token is its attention mask's last 1; transformers takes the last token that is not
    `pad_token_id`, which differs only where a real token is the pad id (GPT-2's EOS as pad).

    Params: `{"transformer": ..., "score": {"kernel": [D, num_labels]}}`; PEFT's SEQ_CLS task trains
    `score` in full (`LoraConfig(trainable="score")`).
    """

    config: BaseConfig
    num_labels: int

    def __post_init__(self) -> None:
        if not isinstance(self.num_labels, int) or isinstance(self.num_labels, bool) or self.num_labels < 1:
            raise ValueError(f"num_labels must be a positive integer, got {self.num_labels!r}")

    def apply(
        self,
        params: Params,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        deterministic: bool = True,
        rng: jax.Array | None = None,
    ) -> jax.Array:
        """Class logits [B, num_labels] in the compute dtype; the decoder runs as in `CausalLM.apply`
        (left or right padding), and only the pooled row reaches the head."""
        last = last_token_index(input_ids, attention_mask, self.config.pad_token_id)  # [B]
        hidden = CausalLM(self.config).apply(params, input_ids, attention_mask, return_hidden=True,
                                             positions=last[:, None], deterministic=deterministic, rng=rng)
        kernel = params[SCORE]["kernel"]  # [D, num_labels]
        return jnp.einsum("bd,dl->bl", hidden[:, 0], kernel.astype(hidden.dtype))

    def init_head(self, key: jax.Array, dtype: Any = None) -> Params:
        """A new `{"score": {"kernel"}}` (`head_kernel`), as transformers initialises it."""
        return {SCORE: {"kernel": head_kernel(self.config, self.num_labels, key, dtype)}}
