"""BLOOM in Flax linen, parameter-compatible with Hugging Face `BloomForCausalLM`.

Params (unrolled; scanned layouts drop the `{i}` level and stack leaves to [L, ...]):
  transformer/word_embeddings/embedding [V, D]
  transformer/word_embeddings_layernorm/{scale,bias}
  transformer/h/{i}/input_layernorm/{scale,bias}
  transformer/h/{i}/self_attention/query_key_value/{kernel [D, 3D], bias}
  transformer/h/{i}/self_attention/dense/{kernel [D, D], bias}
  transformer/h/{i}/post_attention_layernorm/{scale,bias}
  transformer/h/{i}/mlp/dense_h_to_4h/{kernel [D, 4D], bias}
  transformer/h/{i}/mlp/dense_4h_to_h/{kernel [4D, D], bias}
  transformer/ln_f/{scale,bias}
HF Linear weights are (out, in) and are transposed to kernels at load time. The fused QKV
columns keep HF's per-head interleaved order (H, 3, Dh): the forward pass splits heads, the
kernel is never permuted, so LoRA B matrices line up with PEFT's `lora_B`. No position
embeddings: ALiBi adds `slope_h * key_position` to the attention logits. Tied LM head.

    from lora_jax.models import from_pretrained
    model, params = from_pretrained("bigscience/bloom-560m", dtype=jnp.bfloat16)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.models.common import (
    AttnContext,
    BaseConfig,
    attention,
    attention_inputs,
    dense,
    embed,
    hf_get,
    layer_norm,
    run_layers,
    take_rows,
    update_kv,
)

# Published sizes (vocab 250880); bloomz-* share the architecture of bloom-*.
PRESETS: dict[str, dict[str, int]] = {
    "bloom-560m": dict(num_layers=24, hidden_size=1024, num_heads=16),
    "bloom-1b1": dict(num_layers=24, hidden_size=1536, num_heads=16),
    "bloom-1b7": dict(num_layers=24, hidden_size=2048, num_heads=16),
    "bloom-3b": dict(num_layers=30, hidden_size=2560, num_heads=32),
    "bloom-7b1": dict(num_layers=30, hidden_size=4096, num_heads=32),
    "bloom": dict(num_layers=70, hidden_size=14336, num_heads=112),
}
PRESETS.update({"bloomz" + k[len("bloom"):]: v for k, v in PRESETS.items()})


@dataclasses.dataclass(frozen=True, kw_only=True)
class BloomConfig(BaseConfig):
    """BLOOM architecture; `from_hf(config_json_dict)` or `preset("bloom-560m")`."""

    model_type: ClassVar[str] = "bloom"
    embed_name: ClassVar[str] = "word_embeddings"
    embedding_modules: ClassVar[tuple[str, ...]] = ("word_embeddings",)
    layernorm_modules: ClassVar[tuple[str, ...]] = (
        "word_embeddings_layernorm", "input_layernorm", "post_attention_layernorm", "ln_f",
    )
    linear_modules: ClassVar[tuple[str, ...]] = (
        "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h",
    )
    hf_transpose_linear: ClassVar[bool] = True  # torch Linear weight is (out, in)
    hf_ignored_keys: ClassVar[str] = r"lm_head\.weight"
    hf_architecture: ClassVar[str] = "BloomForCausalLM"
    hf_head_architectures: ClassVar[Mapping[str, str]] = {
        "score": "BloomForSequenceClassification", "qa_outputs": "BloomForQuestionAnswering",
        "classifier": "BloomForTokenClassification",
    }

    apply_residual_connection_post_layernorm: bool = False
    hidden_dropout: float = 0.0

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> BloomConfig:
        """A published size by name, e.g. `BloomConfig.preset("bloomz-7b1")`."""
        name = name.split("/")[-1]
        if name not in PRESETS:
            raise ValueError(f"unknown BLOOM preset {name!r}; known: {sorted(PRESETS)}")
        p = PRESETS[name]
        fields = dict(
            vocab_size=250880, intermediate_size=4 * p["hidden_size"], bos_token_id=1,
            eos_token_id=2, pad_token_id=3, **p,
        )
        return cls(**{**fields, **overrides})

    @classmethod
    def _fields_from_hf(cls, hf: Mapping[str, Any]) -> dict[str, Any]:
        if not hf_get(hf, "tie_word_embeddings", default=True):
            raise ValueError("untied LM heads are not supported (tie_word_embeddings=False)")
        d = hf_get(hf, "hidden_size", "n_embed")
        tp = hf_get(hf, "pretraining_tp", default=1)
        if hf_get(hf, "slow_but_exact", default=False) and tp > 1:
            # transformers then sums per-slice F.linear calls without the bias of self_attention.dense
            # and mlp.dense_4h_to_h, which this model adds
            raise ValueError(f"slow_but_exact=True with pretraining_tp={tp} is not supported (transformers leaves "
                             "out two biases there); set slow_but_exact to false")
        return dict(
            vocab_size=hf_get(hf, "vocab_size"),
            hidden_size=d,
            num_layers=hf_get(hf, "n_layer", "num_hidden_layers"),
            num_heads=hf_get(hf, "n_head", "num_attention_heads"),
            intermediate_size=4 * d,  # fixed in HF's BloomMLP
            layer_norm_epsilon=hf_get(hf, "layer_norm_epsilon", default=1e-5),
            apply_residual_connection_post_layernorm=hf_get(
                hf, "apply_residual_connection_post_layernorm", default=False
            ),
            hidden_dropout=hf_get(hf, "hidden_dropout", default=0.0),
            bos_token_id=hf_get(hf, "bos_token_id", default=None),
            eos_token_id=hf_get(hf, "eos_token_id", default=None),
            pad_token_id=hf_get(hf, "pad_token_id", default=None),
        )

    def _hf_fields(self) -> dict[str, Any]:
        return dict(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, n_layer=self.num_layers,
            n_head=self.num_heads, layer_norm_epsilon=self.layer_norm_epsilon,
            apply_residual_connection_post_layernorm=self.apply_residual_connection_post_layernorm,
            hidden_dropout=self.hidden_dropout,
        )

    def make_module(self, deterministic: bool) -> nn.Module:
        return BloomTransformer(self, deterministic)


def alibi_slopes(num_heads: int) -> np.ndarray:
    """Per-head ALiBi slopes [H] (geometric; interleaved extras when H is not a power of 2)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = base ** np.arange(1, closest + 1)
    if closest != num_heads:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        extra = min(closest, num_heads - closest)
        slopes = np.concatenate([slopes, extra_base ** np.arange(1, 2 * extra, 2)])
    return slopes.astype(np.float32)


def alibi_bias(num_heads: int, key_positions: jax.Array) -> jax.Array:
    """ALiBi as an additive bias [B, H, 1, S] from key position ids [B, S].

    HF adds `slope * key_position` rather than `slope * (key - query)`: softmax is invariant to
    a per-query constant, and counting real tokens only makes left padding harmless.
    """
    slopes = jnp.asarray(alibi_slopes(num_heads))  # [H]
    return slopes[None, :, None, None] * key_positions[:, None, None, :].astype(jnp.float32)


class BloomAttention(nn.Module):
    config: BloomConfig
    deterministic: bool

    @nn.compact
    def __call__(self, x, kv, ctx: AttnContext):
        cfg = self.config
        B, T, D = x.shape
        H, Dh = cfg.num_heads, cfg.head_dim
        qkv = dense(cfg, 3 * D, "query_key_value")(x)  # [B, T, 3D], columns (H, 3, Dh)
        qkv = qkv.reshape(B, T, H, 3, Dh)  # [B, T, H, 3, Dh]
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]  # [B, T, H, Dh]
        if ctx.queries is not None:
            q = take_rows(q, ctx.queries)  # [B, K, H, Dh]
        k, v, new_kv = update_kv(kv, k, v, ctx.index)  # [B, S, H, Dh]
        y = attention(cfg, q, k, v, ctx)  # [B, T|K, H, Dh]
        return dense(cfg, D, "dense")(y.reshape(B, -1, D)), new_kv  # [B, T|K, D]


class BloomMLP(nn.Module):
    config: BloomConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        h = dense(cfg, cfg.intermediate_size, "dense_h_to_4h")(x)  # [B, T, 4D]
        return dense(cfg, cfg.hidden_size, "dense_4h_to_h")(jax.nn.gelu(h, approximate=True))


class BloomBlock(nn.Module):
    """Pre-LN block; the residual is the LN output when apply_residual_connection_post_layernorm."""

    config: BloomConfig
    deterministic: bool

    @nn.compact
    def __call__(self, x, kv, ctx: AttnContext):
        cfg = self.config
        drop = nn.Dropout(cfg.hidden_dropout, deterministic=self.deterministic)
        post_ln = cfg.apply_residual_connection_post_layernorm
        h = layer_norm(cfg, "input_layernorm")(x)
        a, new_kv = BloomAttention(cfg, self.deterministic, name="self_attention")(h, kv, ctx)
        x = h if post_ln else x
        x = (x if ctx.queries is None else take_rows(x, ctx.queries)) + drop(a)  # [B, T|K, D]
        h = layer_norm(cfg, "post_attention_layernorm")(x)
        x = (h if post_ln else x) + drop(BloomMLP(cfg, name="mlp")(h))
        return x, new_kv


class BloomTransformer(nn.Module):
    """Embeddings + embedding LayerNorm, blocks, final LayerNorm -> hidden [B, T, D], or [B, K, D]
    at `queries` [B, K] (and the new cache)."""

    config: BloomConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, cache=None, segment_ids=None, queries=None):
        cfg = self.config
        B, T = input_ids.shape
        inp = attention_inputs(attention_mask, cache, B, T, segment_ids)
        x = embed(cfg, cfg.vocab_size, "word_embeddings")(input_ids).astype(cfg.dtype)  # [B, T, D]
        x = layer_norm(cfg, "word_embeddings_layernorm")(x)
        kv = None if cache is None else (cache["k"], cache["v"])
        ctx = AttnContext(inp.mask, alibi_bias(cfg.num_heads, inp.key_positions), inp.index, queries)
        x, new_kv = run_layers(BloomBlock, cfg, self.deterministic, x, kv, ctx)
        x = layer_norm(cfg, "ln_f")(x)  # [B, T|K, D]
        if cache is None:
            return x, None
        return x, dict(k=new_kv[0], v=new_kv[1], mask=inp.key_mask, index=cache["index"] + T)
