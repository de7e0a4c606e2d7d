"""SQuAD evaluation: batched KV-cache greedy generation, decoding, official EM/F1."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from lora_jax.models import generate

from . import data
from .metrics import squad_scores


def decode_answer(tokenizer, tokens: np.ndarray, eos_id: int) -> str:
    """Text of the generated tokens up to the first EOS."""
    toks = tokens.tolist()
    if eos_id in toks:
        toks = toks[: toks.index(eos_id)]
    return tokenizer.decode(toks, skip_special_tokens=True).strip()


def predict(apply_fn: Callable[..., Any], params, model, tokenizer, examples: Sequence[data.Encoded], *,
            batch_size: int, buckets: Sequence[int], max_new_tokens: int) -> dict[str, str]:
    """Greedy answers {id: text} for eval prompts; one compile per prompt bucket."""
    eos = int(tokenizer.eos_token_id)
    pad = data.pad_id_of(tokenizer)
    gen = jax.jit(lambda p, ids, mask: generate(apply_fn, p, ids, mask, model=model, max_new_tokens=max_new_tokens,
                                                eos_token_id=eos, pad_token_id=pad))
    out: dict[str, str] = {}
    for batch in data.eval_batches(examples, batch_size=batch_size, buckets=buckets, pad_id=pad):
        new = np.asarray(gen(params, batch["input_ids"], batch["attention_mask"]))  # [B, max_new_tokens]
        for i, ex_id in enumerate(batch["ids"]):
            if batch["valid"][i]:
                out[ex_id] = decode_answer(tokenizer, new[i], eos)
    return out


def evaluate(apply_fn, params, model, tokenizer, examples, records, **kw) -> tuple[dict[str, float], dict[str, str]]:
    """(scores {"exact_match", "f1"}, predictions) on the encoded eval examples."""
    preds = predict(apply_fn, params, model, tokenizer, examples, **kw)
    by_id = {r.id: r for r in records}
    return squad_scores(preds, [by_id[i] for i in preds]), preds
