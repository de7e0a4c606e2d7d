"""Extractive SQuAD (`python -m train.squad --extractive`): the answer is a span of the context,
picked by a start / end head on every token (transformers' `*ForQuestionAnswering`, trained as
its `run_qa.py` example trains it), instead of generated text.

A record becomes one or more features: the question's tokens, then a window of the context's
(`doc_stride` tokens shared by neighbouring windows when the context does not fit), right-padded.
The question comes first, as run_qa.py puts it for a right-padding tokenizer: a causal model's
context tokens then see the question. A window that holds the whole first gold answer is labelled
with its first and last token, any other (and an unanswerable record) with token 0.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax as lj
from lora_jax.models.heads import best_spans

from .data import QARecord, token_span, bucket_for
from .evaluate import score_answers
from .metrics import best_thresholds


@dataclass(frozen=True)
class Feature:
    """One window of a record: `tokens` = question + context[window]."""

    id: str  # the record's
    tokens: np.ndarray  # int32 [n]
    context_start: int  # tokens[context_start:] are the context window's
    offsets: np.ndarray  # int32 [n - context_start, 2]: each context token's characters [start, end)
    start: int  # the gold answer's first and last token (inclusive); 0, 0: not in this window
    end: int

    @property
    def length(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class Features:
    """A split's features, plus the records none could hold (their question fills --max-len)."""

    features: tuple[Feature, ...]
    skipped: int
    split_records: int  # records cut into more than one window


def windows(n: int, room: int, stride: int) -> list[tuple[int, int]]:
    """[start, end) slices of n context tokens as the tokenizer's overflowing windows cut them
    (run_qa.py's): `room` long, each starting `room - stride` after the one before (so neighbours
    share `stride` tokens), the last one the first to reach n (it may be shorter). Needs
    stride < room."""
    out, start = [], 0
    while True:
        out.append((start, min(start + room, n)))
        if start + room >= n:
            return out
        start += room - stride


def featurize(tokenizer: Any, records: Sequence[QARecord], max_len: int, doc_stride: int) -> Features:
    """The features of `records` in order: at most `max_len` tokens each; a record whose question
    leaves no more than `doc_stride` context tokens per window when its context needs several is
    skipped (counted), as the tokenizer refuses such a stride."""
    contexts = list(dict.fromkeys(r.context for r in records))  # SQuAD shares contexts
    enc = tokenizer(contexts, add_special_tokens=False, return_offsets_mapping=True) if contexts else None
    ctx_of = {c: (enc["input_ids"][i], enc["offset_mapping"][i]) for i, c in enumerate(contexts)}
    # run_qa.py strips the questions' leading whitespace (some SQuAD questions have a lot of it)
    questions = tokenizer([r.question.lstrip() for r in records], add_special_tokens=False)["input_ids"] \
        if records else []
    out, skipped, split = [], 0, 0
    for rec, q in zip(records, questions):
        ids, offsets = ctx_of[rec.context]
        room = max_len - len(q)
        if room <= 0 or (len(ids) > room and room <= doc_stride):
            skipped += 1
            continue
        gold = None
        if rec.answerable:
            a = rec.answer_starts[0]
            gold = token_span(offsets, a, a + len(rec.answers[0]))  # [i0, i1) of the context's tokens
        spans = windows(len(ids), room, doc_stride)
        split += len(spans) > 1
        for lo, hi in spans:
            start = end = 0
            if gold is not None and lo <= gold[0] and gold[1] <= hi:
                start, end = len(q) + gold[0] - lo, len(q) + gold[1] - 1 - lo
            out.append(Feature(rec.id, np.asarray(q + ids[lo:hi], np.int32), len(q),
                               np.asarray(offsets[lo:hi], np.int32).reshape(-1, 2), start, end))
    return Features(tuple(out), skipped, split)


def make_batch(features: Sequence[Feature], batch_size: int, buckets: Sequence[int],
               pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded batch of exactly `batch_size` rows: input_ids, attention_mask, context_mask (the
    tokens an answer may use), start_positions / end_positions and weight (1 for a feature, 0 for
    a filler row, which stays fully visible so that no row is all padding)."""
    if not 0 < len(features) <= batch_size:
        raise ValueError(f"need 1..{batch_size} features, got {len(features)}")
    T = bucket_for(max(f.length for f in features), buckets)
    batch = {"input_ids": np.full((batch_size, T), pad_id, np.int32),
             "attention_mask": np.ones((batch_size, T), np.int32),
             "context_mask": np.zeros((batch_size, T), bool),
             "start_positions": np.zeros(batch_size, np.int32), "end_positions": np.zeros(batch_size, np.int32),
             "weight": np.zeros(batch_size, np.float32)}
    for i, f in enumerate(features):
        batch["input_ids"][i, : f.length] = f.tokens
        batch["attention_mask"][i, f.length:] = 0
        batch["context_mask"][i, f.context_start: f.length] = True
        batch["start_positions"][i], batch["end_positions"][i], batch["weight"][i] = f.start, f.end, 1.0
    return batch


def span_logits(model, lora: lj.LoraConfig | None) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """f(params, adapters, input_ids, attention_mask, rng) -> (start, end) logits [B, T] of a
    `QuestionAnswering` model, under LoRA (dropout when an rng is given) or, lora=None, alone."""
    if lora is None:
        return lambda p, _a, ids, mask, _rng: model.apply(p, ids, mask)
    g = lj.apply(model.apply, lora)
    return lambda p, a, ids, mask, rng: g(p, a, ids, mask, lora_rng=rng if lora.dropout > 0 else None)


def span_loss(logits_fn: Callable[..., tuple[jax.Array, jax.Array]]) -> Callable[..., tuple]:
    """`loss(params, adapters, batch, rng) -> (sum over features of (CE(start) + CE(end)) / 2,
    features)`: transformers' QA loss per feature, the softmax over the row's tokens (padding left
    out, so a bucket's length changes nothing)."""
    def loss(params, adapters, batch, rng):
        mask = batch["attention_mask"].astype(bool)
        total = 0.0
        for logits, gold in zip(logits_fn(params, adapters, batch["input_ids"], batch["attention_mask"], rng),
                                (batch["start_positions"], batch["end_positions"])):
            x = jnp.where(mask, logits.astype(jnp.float32), -jnp.inf)  # [B, T]
            total = total + jax.nn.logsumexp(x, axis=1) - jnp.take_along_axis(x, gold[:, None], axis=1)[:, 0]
        w = batch["weight"]
        return jnp.sum(w * total / 2), jnp.sum(w)
    return loss


@functools.partial(jax.jit, static_argnums=(0, 5))
def _best(apply_fn, params, ids, mask, allowed, max_answer_len):
    """(spans [B, 2], span scores [B], null scores [B]) of one batch."""
    start, end = apply_fn(params, ids, mask)
    spans, scores = best_spans(start, end, allowed, max_answer_len=max_answer_len)
    return spans, scores, (start[:, 0] + end[:, 0]).astype(jnp.float32)


class Answer(NamedTuple):
    """A record's best span over its features, and its null score."""

    text: str  # the context's characters between the span's first and last token, stripped
    score: float  # the span's start + end logit
    null: float  # the lowest null score (token 0's start + end logit) over the record's features


def best_answers(apply_fn: Callable[..., Any], params, features: Sequence[Feature], records: Sequence[QARecord], *,
                 batch_size: int, buckets: Sequence[int], pad_id: int, max_answer_len: int = 30) -> dict[str, Answer]:
    """{id: Answer}, as run_qa.py's postprocessing finds them: each record's best span over its
    features (start + end logit, in the context, at most `max_answer_len` tokens; found
    exhaustively, where run_qa.py searches the pairs of its 20 best starts and ends).

    `apply_fn(params, input_ids, attention_mask) -> (start, end)`; one compile per bucket, reused by
    later calls with the same `apply_fn` (give adapters inside `params`, as `evaluate.predict`)."""
    context = {r.id: r.context for r in records}
    best: dict[str, tuple[float, str]] = {}
    null: dict[str, float] = {}
    order = sorted(features, key=lambda f: -f.length)  # longest first: less padding
    for i in range(0, len(order), batch_size):
        chunk = order[i: i + batch_size]
        batch = make_batch(chunk, batch_size, buckets, pad_id)
        spans, scores, nulls = map(np.asarray, _best(apply_fn, params, batch["input_ids"], batch["attention_mask"],
                                                     batch["context_mask"], max_answer_len))
        for f, (s, e), score, n in zip(chunk, spans, scores, nulls):
            a, b = f.offsets[s - f.context_start][0], f.offsets[e - f.context_start][1]
            if f.id not in best or score > best[f.id][0]:
                best[f.id] = (float(score), context[f.id][a:b].strip())  # a token's offsets may hold its space
            null[f.id] = min(null.get(f.id, np.inf), float(n))
    return {k: Answer(text, score, null[k]) for k, (score, text) in best.items()}


def null_odds(answers: dict[str, Answer]) -> dict[str, float]:
    """{id: null score - best span score}: run_qa.py's `null_odds` file, evaluate-v2.0.py's na_prob."""
    return {k: a.null - a.score for k, a in answers.items()}


def predict(apply_fn: Callable[..., Any], params, features: Sequence[Feature], records: Sequence[QARecord], *,
            v2: bool = False, null_threshold: float = 0.0, **kw) -> dict[str, str]:
    """Answers {id: text}: `best_answers`' spans; on SQuAD v2.0, "" where the null odds exceed
    `null_threshold` (run_qa.py's null_score_diff_threshold). `kw`: `best_answers`'."""
    return choose(best_answers(apply_fn, params, features, records, **kw), v2=v2, null_threshold=null_threshold)


def choose(answers: dict[str, Answer], *, v2: bool, null_threshold: float = 0.0) -> dict[str, str]:
    """{id: text}, "" on v2.0 where the null odds exceed `null_threshold`."""
    odds = null_odds(answers)
    return {k: "" if v2 and odds[k] > null_threshold else a.text for k, a in answers.items()}


def evaluate(apply_fn, params, features: Sequence[Feature], records: Sequence[QARecord], *, v2: bool = False,
             null_threshold: float = 0.0, **kw) -> tuple[dict[str, Any], dict[str, str], dict[str, float] | None]:
    """(scores, predictions, null odds) of `predict`'s answers; scores as `evaluate.evaluate` gives
    them, on v2.0 with evaluate-v2.0.py's best thresholds (`metrics.best_thresholds`) over the null
    odds, which are None on v1.1."""
    answers = best_answers(apply_fn, params, features, records, **kw)
    preds = choose(answers, v2=v2, null_threshold=null_threshold)
    scores = score_answers(preds, records, v2=v2)
    if not v2:
        return scores, preds, None
    odds = null_odds(answers)
    return scores | best_thresholds({k: a.text for k, a in answers.items()}, odds, records), preds, odds
