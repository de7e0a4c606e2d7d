"""SQuAD evaluation: batched KV-cache generation (greedy or beam search), decoding, official EM/F1; LM loss
on text."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.models import generate

from . import data
from .metrics import squad_scores, squad_v2_scores


def decode_answer(tokenizer, tokens: np.ndarray, eos_id: int) -> str:
    """Text of the generated tokens up to the first EOS."""
    toks = tokens.tolist()
    if eos_id in toks:
        toks = toks[: toks.index(eos_id)]
    return tokenizer.decode(toks, skip_special_tokens=True).strip()


def predict(apply_fn: Callable[..., Any], params, model, tokenizer, examples: Sequence[data.Encoded], *,
            batch_size: int, buckets: Sequence[int], max_new_tokens: int, num_beams: int = 1,
            length_penalty: float = 1.0) -> dict[str, str]:
    """Answers {id: text} for eval prompts, greedy or the best of a beam search.

    One compile per prompt bucket, kept for later calls with the same `apply_fn` object: give
    adapters as part of `params` (an apply_fn over `(params, adapters)`), not closed over, and
    scoring another adapter of the same shapes compiles nothing (closed-over arrays would also be
    baked into the program as constants)."""
    eos = int(tokenizer.eos_token_id)
    pad = data.pad_id_of(tokenizer)
    out: dict[str, str] = {}
    for batch in data.eval_batches(examples, batch_size=batch_size, buckets=buckets, pad_id=pad):
        new = np.asarray(generate(apply_fn, params, batch["input_ids"], batch["attention_mask"], model=model,
                                  max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                                  num_beams=num_beams, length_penalty=length_penalty))  # [B, max_new_tokens]
        for i, ex_id in enumerate(batch["ids"]):
            if batch["valid"][i]:
                out[ex_id] = decode_answer(tokenizer, new[i], eos)
    return out


def evaluate(apply_fn, params, model, tokenizer, examples, records, *, v2: bool = False,
             **kw) -> tuple[dict[str, Any], dict[str, str]]:
    """(scores {"exact_match", "f1"} (v2: with `has_answer` / `no_answer` parts), predictions) on
    the encoded eval examples; an empty answer (EOS first) is the v2.0 "no answer"."""
    preds = predict(apply_fn, params, model, tokenizer, examples, **kw)
    return score_answers(preds, records, v2=v2), preds


def score_answers(preds: dict[str, str], records, *, v2: bool = False) -> dict[str, Any]:
    """The official SQuAD v1.1 (or v2.0) scores of answers {id: text} over `records`; a record
    without an answer (its prompt did not fit) scores 0, as in evaluate-v1.1.py."""
    return (squad_v2_scores if v2 else squad_scores)(preds, records)


def text_loss(apply_fn: Callable[..., Any], params, tokenizer, texts: Sequence[str], *, max_len: int,
              batch_size: int) -> float:
    """Mean next-token loss (nats per token) on plain texts, each cut to `max_len` tokens: how well
    the model still models the domain's language, which fine-tuning can make it forget.

    `apply_fn(params, input_ids, attention_mask)` -> logits; one compiled shape [batch_size, max_len],
    kept for later calls with the same `apply_fn` object (as `predict`).
    """
    rows = [np.asarray(tokenizer(t)["input_ids"][:max_len], np.int32) for t in texts]
    rows = [r for r in rows if len(r) > 1]
    if not rows:
        raise ValueError("text_loss: no text of two or more tokens to score")
    pad = data.pad_id_of(tokenizer)
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        ids = np.full((batch_size, max_len), pad, np.int32)
        mask = np.zeros((batch_size, max_len), np.int32)
        for j, r in enumerate(rows[i: i + batch_size]):
            ids[j, : len(r)], mask[j, : len(r)] = r, 1
        s, c = _loss_sums(apply_fn, params, ids, mask)
        total, count = total + float(s), count + int(c)
    return total / count


@functools.partial(jax.jit, static_argnums=0)
def _loss_sums(apply_fn, params, ids, mask):
    """(sum of next-token losses, scored tokens) of one batch [B, T]."""
    logp = jax.nn.log_softmax(apply_fn(params, ids, mask)[:, :-1].astype(jnp.float32))  # [B, T-1, V]
    tok = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]  # [B, T-1]
    scored = (mask[:, 1:] * mask[:, :-1]).astype(bool)
    return -jnp.where(scored, tok, 0.0).sum(), scored.sum()  # an all-padding row may hold NaN logits
