"""Resizing the token embedding table (transformers' `resize_token_embeddings`), e.g. for new tokens.

    tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|bot|>"]})
    model, params = resize_token_embeddings(model, params, len(tokenizer))

The LM head is tied to the table, so it follows. New rows start, as in transformers (its
`mean_resizing=True` default), at the mean of the old ones: the model's next-token distribution
then hardly moves, since every new logit is the average old one. Train them with
`LoraConfig(trainable_tokens=...)`; a PEFT export carries the table with `save_embedding_layers`.
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

import jax
import jax.numpy as jnp

from lora_jax.models.common import Params

Model = TypeVar("Model")

MEAN_RESIZING_EPSILON = 1e-9  # transformers: new rows ~ N(mean, 1e-9 * covariance of the old rows)


def _mean_rows(table: jax.Array, added: int, key: jax.Array | None) -> jax.Array:
    """[added, D] fp32 rows at the old rows' mean; with a key, drawn from N(mean, 1e-9 * cov) as
    transformers does (falling back to the mean where cov is not positive definite, as it does)."""
    w = table.astype(jnp.float32)  # [V, D]
    mean = w.mean(axis=0)
    rows = jnp.broadcast_to(mean, (added, w.shape[1]))
    if key is None:
        return rows
    centred = w - mean
    cov = MEAN_RESIZING_EPSILON * (centred.T @ centred) / w.shape[0]  # [D, D]
    chol = jnp.linalg.cholesky(cov)  # NaN where cov is not positive definite
    noise = jax.random.normal(key, (added, w.shape[1])) @ chol.T
    return jnp.where(jnp.all(jnp.isfinite(chol)), rows + noise, rows)


def resize_token_embeddings(model: Model, params: Params, new_num_tokens: int | None = None, *,
                            pad_to_multiple_of: int | None = None, mean_resizing: bool = True,
                            key: jax.Array | None = None) -> tuple[Model, Params]:
    """(model, params) with `new_num_tokens` rows in the token embedding table (and tied LM head).

    Args:
      model: a `CausalLM` or one with a task head (`SequenceClassifier`, `QuestionAnswering`,
        `TokenClassifier`); the returned one has the new `vocab_size`
        (which `save_hf_checkpoint` / `peft.save_merged` write).
      params: its params (unrolled or scanned); only the embedding table changes.
      new_num_tokens: the new vocabulary size (None: the current one, for `pad_to_multiple_of`).
        Fewer rows drop the last ones; the config's bos / eos / pad ids must stay below it.
      pad_to_multiple_of: round the size up to a multiple of this (Tensor Core / TPU friendly).
      mean_resizing: new rows at the old rows' mean (transformers' default); False draws them
        from N(0, initializer_range), which needs `key`.
      key: with `mean_resizing`, adds transformers' N(0, 1e-9 * covariance) noise to the mean
        (a no-op in practice; without a key the rows are the mean exactly).
    """
    cfg = model.config
    table = params["transformer"][cfg.embed_name]["embedding"]  # [V, D]
    old, dim = table.shape
    n = old if new_num_tokens is None else new_num_tokens
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"new_num_tokens must be a positive integer, got {new_num_tokens!r}")
    if pad_to_multiple_of is not None:
        if not isinstance(pad_to_multiple_of, int) or isinstance(pad_to_multiple_of, bool) or pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of!r}")
        n = -(-n // pad_to_multiple_of) * pad_to_multiple_of
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        token = getattr(cfg, name)
        token = max(token) if isinstance(token, tuple) else token  # several EOS ids
        if token is not None and token >= n:
            raise ValueError(f"cannot resize the vocabulary to {n} tokens: the config's {name} is {token}")
    if n == old:
        return model, params
    if n > old:
        if mean_resizing:
            rows = _mean_rows(table, n - old, key)
        elif key is None:
            raise ValueError("mean_resizing=False draws the new rows at random: pass key=")
        else:
            std = float(cfg.hf_config.get("initializer_range") or 0.02)
            rows = std * jax.random.normal(key, (n - old, dim), jnp.float32)
        new_table = jnp.concatenate([table, rows.astype(table.dtype)])  # [n, D]
    else:
        new_table = table[:n]
    embedding = dict(params["transformer"][cfg.embed_name], embedding=new_table)
    new_params = dict(params, transformer=dict(params["transformer"], **{cfg.embed_name: embedding}))
    return dataclasses.replace(model, config=cfg.replace(vocab_size=n)), new_params
