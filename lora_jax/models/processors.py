"""transformers' logits processors for generation, in its order: repetition penalty, no repeated
n-grams, a minimum of new tokens; then, when sampling, its warpers (temperature, top-k, top-p).
Greedy and sampled generation apply them to the logits, beam search to the log-probabilities, as
transformers does.

Each row's history is its prompt (pads excluded, so a left-padded row generates what the
unpadded one does; transformers skips a row's leading pads for the repetition penalty but counts
them in n-grams) and the tokens generated so far.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp


def check(repetition_penalty: float | None, no_repeat_ngram_size: int | None,
          min_new_tokens: int | None) -> tuple[float, int, int]:
    """(repetition_penalty, no_repeat_ngram_size, min_new_tokens) checked, None = off (1.0, 0, 0)."""
    p = 1.0 if repetition_penalty is None else repetition_penalty
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p < math.inf:
        raise ValueError(f"repetition_penalty must be a positive number, got {repetition_penalty!r}")
    n = no_repeat_ngram_size or 0
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"no_repeat_ngram_size must be an int >= 0, got {no_repeat_ngram_size!r}")
    m = min_new_tokens or 0
    if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 0:
        raise ValueError(f"min_new_tokens must be an int >= 0, got {min_new_tokens!r}")
    return float(p), int(n), int(m)


def prompt_history(input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """The prompts [B, T] with -1 at the pads: the part of the history that does not change."""
    return jnp.where(attention_mask > 0, input_ids, -1)


def process(scores: jax.Array, prompt: jax.Array, new: jax.Array, t: jax.Array, eos_ids: jax.Array,
            penalty: jax.Array, min_new: jax.Array, *, penalize: bool, ngram: int, floor: bool) -> jax.Array:
    """scores [R, V] for the next token of rows whose history is prompt [R, T] (-1 = pad) and the
    first t of new [R, N] (the rest ignored); eos_ids [E] (-1 = none). Traced: `penalty` (seen
    tokens' scores / penalty if > 0, else * penalty; applied if `penalize`), `min_new` (EOS banned
    while t < min_new; applied if `floor`). Compiled in: `ngram` (0 = off; else a token that would
    repeat an n-gram of the row is banned). With all three off, `scores` as they are (no work per
    step)."""
    if not (penalize or ngram or floor):
        return scores
    R, V = scores.shape
    T = prompt.shape[1]
    hist = jnp.concatenate([prompt, new], axis=1)  # [R, L = T + N]
    L = hist.shape[1]
    known = (jnp.arange(L) < T + t) & (hist >= 0)  # [R, L]
    rows = jnp.arange(R)[:, None]

    def ban(mask: jax.Array, ids: jax.Array) -> jax.Array:
        """[R, V] True at ids [R, K] where mask [R, K] (index V: dropped by the scatter)."""
        return jnp.zeros((R, V), bool).at[rows, jnp.where(mask, ids, V)].set(True, mode="drop")

    if penalize:
        scores = jnp.where(ban(known, hist), jnp.where(scores < 0, scores * penalty, scores / penalty), scores)
    if ngram == 1:  # every token seen so far
        scores = jnp.where(ban(known, hist), -jnp.inf, scores)
    elif ngram and L >= ngram:
        # The n-gram that starts at i is hist[i : i + n]: its first n - 1 tokens against the row's
        # last n - 1; a match bans the token that completed it.
        S = L - ngram + 1  # starts
        last = jax.lax.dynamic_slice_in_dim(hist, T + t - (ngram - 1), ngram - 1, axis=1)  # [R, n-1]
        windows = jnp.stack([hist[:, j:j + S] for j in range(ngram - 1)], axis=-1)  # [R, S, n-1]
        match = jnp.all(windows == last[:, None, :], axis=-1) & (jnp.arange(S) <= T + t - ngram)  # [R, S]
        nxt = hist[:, ngram - 1:]  # [R, S]
        scores = jnp.where(ban(match & (nxt >= 0), nxt), -jnp.inf, scores)
    if not floor:
        return scores
    eos = jnp.zeros((V,), bool).at[jnp.where(eos_ids >= 0, eos_ids, V)].set(True, mode="drop")  # [V]
    return jnp.where(eos & (t < min_new), -jnp.inf, scores)


def warp(scores: jax.Array, temperature: float | jax.Array, *, top_k: int | None = None,
         top_p: float | jax.Array | None = None, min_keep: int = 1) -> jax.Array:
    """transformers' sampling warpers on scores [R, V], in its order: divided by `temperature`,
    then all but the `top_k` best, then all but the fewest best that hold `top_p` of the
    probability mass, set to the lowest float; each filter keeps at least `min_keep` tokens
    (transformers keeps 1 + #EOS ids, 2 without EOS, under beam sampling). top_k 0 / None and
    top_p None: off."""
    scores = scores / temperature
    low = jnp.finfo(scores.dtype).min
    if top_k:
        kth = jax.lax.top_k(scores, min(max(top_k, min_keep), scores.shape[-1]))[0][:, -1:]  # [R, 1]
        scores = jnp.where(scores < kth, low, scores)
    if top_p is not None:
        srt = jnp.sort(scores, axis=-1)[:, ::-1]  # [R, V] descending
        probs = jax.nn.softmax(srt, axis=-1)
        # the smallest prefix whose mass reaches top_p, and at least min_keep tokens
        keep = ((jnp.cumsum(probs, axis=-1) - probs) < top_p) | (jnp.arange(srt.shape[-1]) < min_keep)
        cutoff = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)  # [R, 1]
        scores = jnp.where(scores < cutoff, low, scores)
    return scores
