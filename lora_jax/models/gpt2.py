"""GPT-2 in Flax linen, parameter-compatible with Hugging Face `GPT2LMHeadModel`.

Params (unrolled; scanned layouts drop the `{i}` level and stack leaves to [L, ...]):
  transformer/wte/embedding [V, D]          transformer/wpe/embedding [P, D]
  transformer/h/{i}/ln_1/{scale,bias}       transformer/h/{i}/attn/c_attn/{kernel [D, 3D], bias}
  transformer/h/{i}/attn/c_proj/{kernel [D, D], bias}
  transformer/h/{i}/ln_2/{scale,bias}       transformer/h/{i}/mlp/c_fc/{kernel [D, F], bias}
  transformer/h/{i}/mlp/c_proj/{kernel [F, D], bias}
  transformer/ln_f/{scale,bias}
HF Conv1D weights are already (in, out), i.e. flax kernels; the LM head is tied to `wte`.

    from lora_jax.models import from_pretrained
    model, params = from_pretrained("gpt2")
    logits = model.apply(params, input_ids)  # [B, T, V]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.models.common import (
    AttnContext,
    BaseConfig,
    attention,
    attention_inputs,
    concrete,
    dense,
    embed,
    hf_get,
    layer_norm,
    longest_row,
    run_layers,
    take_rows,
    update_kv,
)

# HF `activation_function` names -> jax functions ("gelu_new" is the tanh approximation).
ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}

# Published sizes (all vocab 50257, 1024 positions; distilgpt2 is a 6-layer gpt2).
PRESETS: dict[str, dict[str, int]] = {
    "distilgpt2": dict(num_layers=6, hidden_size=768, num_heads=12),
    "gpt2": dict(num_layers=12, hidden_size=768, num_heads=12),
    "gpt2-medium": dict(num_layers=24, hidden_size=1024, num_heads=16),
    "gpt2-large": dict(num_layers=36, hidden_size=1280, num_heads=20),
    "gpt2-xl": dict(num_layers=48, hidden_size=1600, num_heads=25),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPT2Config(BaseConfig):
    """GPT-2 architecture; `from_hf(config_json_dict)` or `preset("gpt2-medium")`."""

    model_type: ClassVar[str] = "gpt2"
    embed_name: ClassVar[str] = "wte"
    embedding_modules: ClassVar[tuple[str, ...]] = ("wte", "wpe")
    layernorm_modules: ClassVar[tuple[str, ...]] = ("ln_1", "ln_2", "ln_f")
    linear_modules: ClassVar[tuple[str, ...]] = ("c_attn", "c_proj", "c_fc")
    hf_transpose_linear: ClassVar[bool] = False  # Conv1D weight is (in, out)
    # The causal-mask buffers some checkpoints carry, and the tied head.
    hf_ignored_keys: ClassVar[str] = r"(transformer\.)?h\.\d+\.attn\.(masked_)?bias|lm_head\.weight"
    hf_architecture: ClassVar[str] = "GPT2LMHeadModel"
    hf_head_architectures: ClassVar[Mapping[str, str]] = {
        "score": "GPT2ForSequenceClassification", "qa_outputs": "GPT2ForQuestionAnswering",
        "classifier": "GPT2ForTokenClassification",
    }

    max_position_embeddings: int = 1024
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True
    embd_pdrop: float = 0.1
    resid_pdrop: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(f"unsupported activation_function {self.activation_function!r}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> GPT2Config:
        """A published size by name, e.g. `GPT2Config.preset("gpt2-xl", scan_layers=True)`."""
        if name not in PRESETS:
            raise ValueError(f"unknown GPT-2 preset {name!r}; known: {sorted(PRESETS)}")
        p = PRESETS[name]
        fields = dict(
            vocab_size=50257, intermediate_size=4 * p["hidden_size"], bos_token_id=50256,
            eos_token_id=50256, **p,
        )
        return cls(**{**fields, **overrides})

    @classmethod
    def _fields_from_hf(cls, hf: Mapping[str, Any]) -> dict[str, Any]:
        if hf_get(hf, "scale_attn_by_inverse_layer_idx", default=False):
            raise ValueError("scale_attn_by_inverse_layer_idx=True is not supported")
        if not hf_get(hf, "tie_word_embeddings", default=True):
            raise ValueError("untied LM heads are not supported (tie_word_embeddings=False)")
        d = hf_get(hf, "n_embd", "hidden_size")
        return dict(
            vocab_size=hf_get(hf, "vocab_size"),
            hidden_size=d,
            num_layers=hf_get(hf, "n_layer", "num_hidden_layers"),
            num_heads=hf_get(hf, "n_head", "num_attention_heads"),
            intermediate_size=hf_get(hf, "n_inner", default=4 * d),
            max_position_embeddings=hf_get(hf, "n_positions", "max_position_embeddings"),
            layer_norm_epsilon=hf_get(hf, "layer_norm_epsilon", default=1e-5),
            activation_function=hf_get(hf, "activation_function", default="gelu_new"),
            scale_attn_weights=hf_get(hf, "scale_attn_weights", default=True),
            embd_pdrop=hf_get(hf, "embd_pdrop", default=0.1),
            resid_pdrop=hf_get(hf, "resid_pdrop", default=0.1),
            bos_token_id=hf_get(hf, "bos_token_id", default=None),
            eos_token_id=hf_get(hf, "eos_token_id", default=None),
            pad_token_id=hf_get(hf, "pad_token_id", default=None),
        )

    def _hf_fields(self) -> dict[str, Any]:
        return dict(
            vocab_size=self.vocab_size, n_embd=self.hidden_size, n_layer=self.num_layers,
            n_head=self.num_heads, n_inner=self.intermediate_size,
            n_positions=self.max_position_embeddings, layer_norm_epsilon=self.layer_norm_epsilon,
            activation_function=self.activation_function,
            scale_attn_weights=self.scale_attn_weights, embd_pdrop=self.embd_pdrop,
            resid_pdrop=self.resid_pdrop,
        )

    def make_module(self, deterministic: bool) -> nn.Module:
        return GPT2Transformer(self, deterministic)


class GPT2Attention(nn.Module):
    config: GPT2Config
    deterministic: bool

    @nn.compact
    def __call__(self, x, kv, ctx: AttnContext):
        cfg = self.config
        B, T, D = x.shape
        H, Dh = cfg.num_heads, cfg.head_dim
        qkv = dense(cfg, 3 * D, "c_attn")(x)  # [B, T, 3D], columns [q | k | v]
        qkv = qkv.reshape(B, T, 3, H, Dh)  # [B, T, 3, H, Dh]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, H, Dh]
        if ctx.queries is not None:
            q = take_rows(q, ctx.queries)  # [B, K, H, Dh]
        k, v, new_kv = update_kv(kv, k, v, ctx.index)  # [B, S, H, Dh]
        scale = None if cfg.scale_attn_weights else 1.0  # None: 1/sqrt(Dh)
        y = attention(cfg, q, k, v, ctx, scale=scale)  # [B, T|K, H, Dh]
        y = dense(cfg, D, "c_proj")(y.reshape(B, -1, D))  # [B, T|K, D]
        y = nn.Dropout(cfg.resid_pdrop, deterministic=self.deterministic)(y)
        return y, new_kv


class GPT2MLP(nn.Module):
    config: GPT2Config
    deterministic: bool

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        h = ACTIVATIONS[cfg.activation_function](dense(cfg, cfg.intermediate_size, "c_fc")(x))  # [B, T, F]
        y = dense(cfg, cfg.hidden_size, "c_proj")(h)  # [B, T, D]
        return nn.Dropout(cfg.resid_pdrop, deterministic=self.deterministic)(y)


class GPT2Block(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    config: GPT2Config
    deterministic: bool

    @nn.compact
    def __call__(self, x, kv, ctx: AttnContext):
        cfg, det = self.config, self.deterministic
        a, new_kv = GPT2Attention(cfg, det, name="attn")(layer_norm(cfg, "ln_1")(x), kv, ctx)
        x = (x if ctx.queries is None else take_rows(x, ctx.queries)) + a  # [B, T|K, D]
        x = x + GPT2MLP(cfg, det, name="mlp")(layer_norm(cfg, "ln_2")(x))
        return x, new_kv


def _check_positions(limit: int, length: int, attention_mask: jax.Array | None) -> None:
    """Refuse a row whose positions run past GPT-2's learned table (reading there gives NaN: jnp.take
    fills). Positions count real tokens, so a left-padded row may be longer than the table; under
    jit a mask's count is unknown and only an unmasked row is refused."""
    longest = length if attention_mask is None else longest_row(attention_mask)
    if longest is not None and longest > limit:
        raise ValueError(f"a row of {longest} tokens exceeds this GPT-2's max_position_embeddings ({limit}, its "
                         "learned positions)")


class GPT2Transformer(nn.Module):
    """Embeddings, blocks, final LayerNorm -> hidden [B, T, D], or [B, K, D] at `queries` [B, K]
    (and the new cache)."""

    config: GPT2Config
    deterministic: bool = True

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, cache=None, segment_ids=None, queries=None):
        cfg = self.config
        B, T = input_ids.shape
        if cache is None and segment_ids is None and T > cfg.max_position_embeddings:
            _check_positions(cfg.max_position_embeddings, T, attention_mask)
        inp = attention_inputs(attention_mask, cache, B, T, segment_ids)
        if (cache is not None or segment_ids is not None) and (pos := concrete(inp.positions)) is not None:
            # a packed sequence or a cached step past the table (the plain rows were checked above)
            if pos.size and pos.max() >= cfg.max_position_embeddings:
                raise ValueError(f"a sequence reaches position {pos.max()}, past this GPT-2's "
                                 f"max_position_embeddings ({cfg.max_position_embeddings}, its learned positions)")
        x = embed(cfg, cfg.vocab_size, "wte")(input_ids)  # [B, T, D]
        x = x + embed(cfg, cfg.max_position_embeddings, "wpe")(inp.positions)  # [B, T, D]
        x = nn.Dropout(cfg.embd_pdrop, deterministic=self.deterministic)(x.astype(cfg.dtype))
        kv = None if cache is None else (cache["k"], cache["v"])
        ctx = AttnContext(inp.mask, None, inp.index, queries)
        x, new_kv = run_layers(GPT2Block, cfg, self.deterministic, x, kv, ctx)
        x = layer_norm(cfg, "ln_f")(x)  # [B, T|K, D]
        if cache is None:
            return x, None
        return x, dict(k=new_kv[0], v=new_kv[1], mask=inp.key_mask, index=cache["index"] + T)
