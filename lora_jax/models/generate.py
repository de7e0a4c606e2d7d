"""Jitted KV-cache generation: greedy, sampling (temperature, top-k, top-p) or beam search, with
transformers' repetition penalty, n-gram blocking and minimum length; stop at EOS.

    new = generate(model.apply, params, ids, mask, model=model, max_new_tokens=20,
                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # [B, 20]
    best = generate(model.apply, params, ids, mask, model=model, max_new_tokens=20, num_beams=4)
    tokens, scores = beam_search(model.apply, params, ids, mask, model=model, max_new_tokens=20,
                                 num_beams=4, num_return_sequences=2)  # [B, 2, 20], [B, 2]

`apply_fn` has the signature of `CausalLM.apply` over any params tree, so LoRA adapters can come
with the params: `generate(lambda pa, *a, **k: lora_apply(*pa, *a, **k), (params, adapters), ...)`.
The prefill and the decode loop run in one jit, cached per `apply_fn` object: pass the same
function object to reuse the compilation, for any params (and adapters) of the same shapes. A
closure over the adapters works too, but bakes them into the program as constants and compiles
again for each new closure.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.models import beam, processors
from lora_jax.models.common import BaseConfig, CausalLM, Params, longest_row, right_padded_row


def sample_logits(
    logits: jax.Array,
    rng: jax.Array,
    *,
    temperature: float | jax.Array = 0.0,
    top_k: int | None = None,
    top_p: float | jax.Array | None = None,
    greedy: bool | None = None,
) -> jax.Array:
    """Next tokens [B] from logits [B, V]; greedy (argmax) when temperature is 0."""
    logits = logits.astype(jnp.float32)
    if greedy is None:
        greedy = temperature == 0
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = processors.warp(logits, temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(
    jax.jit,
    static_argnames=("apply_fn", "model", "max_new_tokens", "greedy", "top_k", "use_top_p", "penalize", "ngram",
                     "floor"),
)
def _generate(apply_fn, model, params, input_ids, attention_mask, rng, temperature, top_p, eos_ids,
              pad, penalty, min_new, *, max_new_tokens, greedy, top_k, use_top_p, penalize, ngram, floor):
    # eos_ids [E], pad, penalty and min_new are traced: changing them does not recompile (switching a
    # processor on or off does: off, it costs nothing per step).
    B, T = input_ids.shape
    N = max_new_tokens
    prompt = processors.prompt_history(input_ids, attention_mask)  # [B, T]
    warp = functools.partial(
        sample_logits, temperature=temperature, top_k=top_k,
        top_p=top_p if use_top_p else None, greedy=greedy,
    )

    def sample(logits, rng, out, t):
        logits = processors.process(logits.astype(jnp.float32), prompt, out, t, eos_ids, penalty, min_new,
                                    penalize=penalize, ngram=ngram, floor=floor)
        return warp(logits, rng)

    def step_logits(ids, mask, cache):
        # The LM head on the last position only: no [B, T, V] logits. It runs inside apply_fn,
        # so a LoRA adapter on the tied embedding reaches the head too.
        last = jnp.full((ids.shape[0], 1), ids.shape[1] - 1, jnp.int32)  # [B, 1]
        logits, cache = apply_fn(params, ids, mask, cache=cache, positions=last)  # [B, 1, V]
        return logits[:, 0], cache  # [B, V]

    cache = model.init_cache(B, T + N)
    logits, cache = step_logits(input_ids, attention_mask, cache)  # prefill
    rng, sub = jax.random.split(rng)
    out = jnp.full((B, N), pad, jnp.int32)
    tok = sample(logits, sub, out, 0)  # [B]
    out = out.at[:, 0].set(tok)
    done = jnp.isin(tok, eos_ids)

    def cond(state):
        step, _, _, done, _, _ = state
        return (step < N) & ~jnp.all(done)

    def body(state):
        step, tok, cache, done, out, rng = state
        logits, cache = step_logits(tok[:, None], jnp.ones((B, 1), jnp.int32), cache)
        rng, sub = jax.random.split(rng)
        nxt = jnp.where(done, pad, sample(logits, sub, out, step))  # [B]; finished rows emit pad
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, step))
        return step + 1, nxt, cache, done | jnp.isin(nxt, eos_ids), out, rng

    state = (jnp.int32(1), tok, cache, done, out, rng)
    return jax.lax.while_loop(cond, body, state)[4]


def _setup(
    model: CausalLM | None, config: BaseConfig | None, eos_token_id: int | Sequence[int] | None,
    pad_token_id: int | None, input_ids: Any, attention_mask: Any, max_new_tokens: int,
) -> tuple[CausalLM, tuple[int, ...], int]:
    """(model, EOS ids, pad id): the config's EOS unless given; pad = config's pad, else EOS, else 0.
    Checks that the new tokens fit the model's positions, where the prompts are concrete (under
    jit their lengths are not known)."""
    if model is None:
        if config is None:
            raise ValueError("generate needs model= or config=")
        model = CausalLM(config)
    cfg = model.config
    if attention_mask is not None and jnp.shape(attention_mask) != jnp.shape(input_ids):
        raise ValueError(f"attention_mask {jnp.shape(attention_mask)} and input_ids {jnp.shape(input_ids)} "
                         "differ in shape")
    right = right_padded_row(attention_mask) if attention_mask is not None else None
    if right is not None:  # the new tokens would follow the pads: other positions, other answers
        raise ValueError(f"prompt row {right} is right-padded (its attention_mask ends in 0): generation needs "
                         "left padding (tokenizer.padding_side = 'left')")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    limit = getattr(cfg, "max_position_embeddings", None)  # GPT-2's learned positions; BLOOM's ALiBi has none
    longest = jnp.shape(input_ids)[1]
    # The last new token is returned, never fed back: positions run to longest + max_new_tokens - 2.
    if limit is not None and attention_mask is not None and longest + max_new_tokens - 1 > limit:
        longest = longest_row(attention_mask) or 0  # under jit the real lengths are not known
    if limit is not None and longest + max_new_tokens - 1 > limit:
        raise ValueError(f"a prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the model's "
                         f"max_position_embeddings {limit}")
    if eos_token_id is None:
        eos_token_id = cfg.eos_token_id
    eos = () if eos_token_id is None else (
        (int(eos_token_id),) if isinstance(eos_token_id, numbers.Integral) else tuple(int(e) for e in eos_token_id)
    )
    if pad_token_id is None:
        pad_token_id = next(p for p in (cfg.pad_token_id, *eos, 0) if p is not None)
    return model, eos, int(pad_token_id)


def _sampling(temperature: float, top_k: int | None, top_p: float | None, rng: jax.Array | None) -> bool:
    """Whether these settings sample (temperature > 0), once they are checked."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0):
        raise ValueError(f"top_k must be an int >= 0 (0: off), got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if temperature > 0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs an rng")
    return temperature > 0


def generate(
    apply_fn: Callable[..., Any],
    params: Params,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    model: CausalLM | None = None,
    config: BaseConfig | None = None,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    rng: jax.Array | None = None,
    num_beams: int = 1,
    num_return_sequences: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    repetition_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
    min_new_tokens: int | None = None,
) -> jax.Array:
    """Generate `max_new_tokens` after left-padded prompts.

    Args:
      apply_fn: `(params, input_ids, attention_mask, *, cache, positions) -> (logits, cache)`,
        e.g. `model.apply` or a LoRA closure over it (`CausalLM.apply` documents `positions`).
      params: passed to `apply_fn`.
      input_ids, attention_mask: [B, T] prompts, left-padded (mask 0 on the left).
      model / config: the model (or its config) for the cache shape and the special tokens.
      eos_token_id: id(s) that end a row (default: config's); None disables stopping.
      pad_token_id: fills rows after EOS (default: config's pad, else EOS, else 0).
      temperature: 0 = greedy; > 0 samples (needs `rng`), optionally restricted to the top-k
        tokens and/or the top-p probability mass (top_p 1: off, as in transformers). top_k None
        samples from every token; transformers' `generate(do_sample=True)` keeps 50 unless told.
      num_beams, num_return_sequences, length_penalty, early_stopping: num_beams > 1 runs
        `beam_search` (transformers' beam search; beam sampling with temperature > 0) and returns
        its best num_return_sequences hypotheses per prompt, rows b * num_return_sequences + i;
        sampling without beams draws num_return_sequences rows per prompt in the same layout (an
        `apply_fn` that closes over per-row arguments, such as `multi`'s adapter_ids, must repeat
        them likewise).
      repetition_penalty, no_repeat_ngram_size, min_new_tokens: transformers' logits processors
        (None = off): the logits of tokens the row holds (prompt and new, pads excluded) divided
        by the penalty (multiplied where negative); a token that would repeat an n-gram of the
        row banned; EOS banned before min_new_tokens new tokens.
    Returns:
      [B * num_return_sequences, max_new_tokens] int32 new tokens; after a row's EOS only
      `pad_token_id`.
    """
    process = dict(repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                   min_new_tokens=min_new_tokens)
    if num_beams != 1:
        tokens, _ = beam_search(
            apply_fn, params, input_ids, attention_mask, model=model, config=config,
            max_new_tokens=max_new_tokens, num_beams=num_beams, num_return_sequences=num_return_sequences,
            length_penalty=length_penalty, early_stopping=early_stopping, eos_token_id=eos_token_id,
            pad_token_id=pad_token_id, temperature=temperature, top_k=top_k, top_p=top_p, rng=rng, **process,
        )
        return tokens.reshape(-1, tokens.shape[-1])  # [B * num_return_sequences, N]
    model, eos, pad_token_id = _setup(model, config, eos_token_id, pad_token_id, input_ids, attention_mask,
                                      max_new_tokens)
    penalty, ngram, min_new = processors.check(**process)
    greedy = not _sampling(temperature, top_k, top_p, rng)
    n = num_return_sequences
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1 or (greedy and n != 1):
        raise ValueError(f"num_return_sequences must be a positive int, and 1 for greedy generation (it would "
                         f"repeat the same row; beam search returns its best ones), got {n!r}")
    if attention_mask is None:
        attention_mask = jnp.ones(jnp.shape(input_ids), jnp.int32)
    if n > 1:  # each prompt n times in a row, as transformers expands them: rows b * n + i
        input_ids, attention_mask = (jnp.repeat(jnp.asarray(x), n, axis=0) for x in (input_ids, attention_mask))
    return _generate(
        apply_fn, model, params, jnp.asarray(input_ids, jnp.int32),
        jnp.asarray(attention_mask, jnp.int32),
        jax.random.key(0) if rng is None else rng,
        jnp.float32(1.0 if greedy else temperature), jnp.float32(1.0 if top_p is None else top_p),
        jnp.asarray(eos or (-1,), jnp.int32), jnp.int32(pad_token_id), jnp.float32(penalty), jnp.int32(min_new),
        max_new_tokens=int(max_new_tokens), greedy=greedy,
        top_k=top_k, use_top_p=top_p is not None and top_p < 1, penalize=penalty != 1, ngram=ngram, floor=min_new > 0,
    )


def beam_search(
    apply_fn: Callable[..., Any],
    params: Params,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    model: CausalLM | None = None,
    config: BaseConfig | None = None,
    max_new_tokens: int,
    num_beams: int,
    num_return_sequences: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    repetition_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
    min_new_tokens: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    rng: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Beam search after left-padded prompts: transformers' `generate(num_beams=...)`.

    Args:
      apply_fn, params, input_ids, attention_mask, model / config, eos_token_id, pad_token_id,
        repetition_penalty, no_repeat_ngram_size, min_new_tokens: as in `generate` (the
        processors act on the log-probabilities, as in transformers). `apply_fn` runs once on
        the B prompts, then on B * num_beams rows (row b * num_beams + k: beam k of prompt b),
        so per-row data in a closure must follow the rows:
        `adapter_ids=jnp.repeat(ids, x.shape[0] // B)` for `multi.mixed`.
      num_beams: beams kept per prompt.
      num_return_sequences: how many of the best hypotheses to return (at most num_beams).
      length_penalty: a finished hypothesis scores sum(log p) / length**length_penalty, length
        counting its new tokens (EOS included); > 0 favours longer ones.
      early_stopping: True (stop once num_beams hypotheses are finished), False (once no running
        beam could beat the worst finished one at its current length) or "never" (at any length).
      temperature, top_k, top_p, rng: temperature > 0 is beam sampling, transformers'
        `do_sample=True` with beams: the log-probabilities warped (top_k and top_p keep
        1 + #EOS ids tokens at least, 2 without EOS, as there: one of them goes on), each
        step's candidates drawn from the softmax of their summed scores without replacement
        (with `rng`), the best of them going on.
    Returns:
      tokens [B, num_return_sequences, max_new_tokens] int32, best first, `pad_token_id` after a
      hypothesis' EOS; scores [B, num_return_sequences] float32 (transformers' sequences_scores).
    """
    if isinstance(num_beams, bool) or not isinstance(num_beams, numbers.Integral) or num_beams < 1:
        raise ValueError(f"num_beams must be a positive int, got {num_beams!r}")
    if isinstance(num_return_sequences, bool) or not isinstance(num_return_sequences, numbers.Integral) \
            or not 1 <= num_return_sequences <= num_beams:
        raise ValueError(f"num_return_sequences must be an int from 1 to num_beams={num_beams}, "
                         f"got {num_return_sequences!r}")
    if not (isinstance(early_stopping, bool) or early_stopping == "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    model, eos, pad = _setup(model, config, eos_token_id, pad_token_id, input_ids, attention_mask, max_new_tokens)
    penalty, ngram, min_new = processors.check(repetition_penalty, no_repeat_ngram_size, min_new_tokens)
    sample = _sampling(temperature, top_k, top_p, rng)
    if attention_mask is None:
        attention_mask = jnp.ones(jnp.shape(input_ids), jnp.int32)
    tokens, scores = beam.search(
        apply_fn, model, params, jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32),
        jnp.asarray(eos or (-1,), jnp.int32), jnp.int32(pad), jnp.float32(length_penalty), jnp.float32(penalty),
        jnp.int32(min_new), jax.random.key(0) if rng is None else rng, jnp.float32(temperature if sample else 1.0),
        jnp.float32(1.0 if top_p is None else top_p), max_new_tokens=int(max_new_tokens), num_beams=int(num_beams),
        early_stopping=early_stopping, penalize=penalty != 1, ngram=ngram, floor=min_new > 0,
        sample=sample, top_k=(top_k or None) if sample else None, use_top_p=sample and top_p is not None and top_p < 1,
    )
    return tokens[:, :num_return_sequences], scores[:, :num_return_sequences]
