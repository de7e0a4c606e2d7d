"""Jitted KV-cache beam search: the search of transformers' `generate(num_beams=K)`, step for step.
`lora_jax.models.beam_search` and `generate(num_beams=K)` call it.

Each step scores every continuation of the K running beams by its summed log-probability and
keeps the best K * max(2, 1 + #EOS ids), so that K of them are still running even if the best
ones all end. A candidate that ends (an EOS, or the last allowed token) and is among the K best
of its step joins the finished hypotheses with the score sum / length**length_penalty; the K best
finished ones are kept. The search stops as transformers' does: `early_stopping=True` once K
have finished, False when no running beam could still beat the worst finished one at its current
length, "never" when none could at any length. Beam sampling draws each step's candidates
instead of taking the best (`search(sample=True)`). The prompts are prefilled once ([B] rows); the
decode steps run on B * K rows (row b * K + k is beam k of prompt b), with the cache gathered
after each beam's history.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lora_jax.models import processors

NEG = -1.0e9  # transformers' score of an impossible candidate


def _take(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [B, K, ...] at idx [B, M] along the beam axis -> [B, M, ...]."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


@functools.partial(
    jax.jit, static_argnames=("apply_fn", "model", "max_new_tokens", "num_beams", "early_stopping", "penalize",
                              "ngram", "floor", "sample", "top_k", "use_top_p")
)
def search(apply_fn, model, params, input_ids, attention_mask, eos_ids, pad, length_penalty, penalty, min_new,
           rng, temperature, top_p, *, max_new_tokens, num_beams, early_stopping, penalize, ngram, floor,
           sample=False, top_k=None, use_top_p=False):
    """(tokens [B, K, N], scores [B, K]) of the K best finished hypotheses, best first; penalty,
    min_new, penalize, ngram, floor: `processors.process`'s. `sample`: beam sampling, as
    transformers' `generate(num_beams=K, do_sample=True)`: the log-probabilities warped
    (temperature, top_k, top_p if `use_top_p`, each keeping 1 + #EOS ids tokens at least, 2
    without EOS, as transformers: one of them goes on), and each step's candidates drawn without
    replacement from the softmax of their summed scores (the Gumbel top-k trick, where
    transformers draws with `torch.multinomial`), then ranked by score, as transformers 4 and
    >= 5.24 rank them (5.0 to 5.23 kept them in the order drawn)."""
    B, T = input_ids.shape
    K, N = num_beams, max_new_tokens
    # Tokens each beam keeps through top_k / top_p under sampling, as transformers: 1 + #EOS ids (2
    # without EOS, eos_ids = [-1]), so that one at least goes on; and candidates kept per step.
    min_keep = max(2, 1 + eos_ids.shape[0])
    M = min_keep * K
    is_top = jnp.arange(M) < K  # only the K best candidates of a step may finish

    cache = model.init_cache(B, T + N)
    logits, cache = apply_fn(params, input_ids, attention_mask, cache=cache,
                             positions=jnp.full((B, 1), T - 1, jnp.int32))  # [B, 1, V]
    V = logits.shape[-1]
    logits = jnp.repeat(logits[:, 0], K, axis=0)  # [B*K, V]
    cache = model.cache_rows(cache, jnp.repeat(jnp.arange(B), K))
    prompt = jnp.repeat(processors.prompt_history(input_ids, attention_mask), K, axis=0)  # [B*K, T]

    def decode(tok, cache):
        ones = jnp.ones((B * K, 1), jnp.int32)
        logits, cache = apply_fn(params, tok, ones, cache=cache, positions=jnp.zeros_like(ones))
        return logits[:, 0], cache  # [B*K, V]

    def body(state):
        t, logits, cache, run_seq, run_score, seq, score, finished, hopeful, _ = state
        # Every continuation of every running beam: [B, K*V] summed log-probabilities.
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B*K, V]
        logp = processors.process(logp, prompt, run_seq.reshape(B * K, N), t, eos_ids, penalty, min_new,
                                  penalize=penalize, ngram=ngram, floor=floor)
        if sample:
            logp = processors.warp(logp, temperature, top_k=top_k, top_p=top_p if use_top_p else None,
                                   min_keep=min_keep)
        logp = (logp.reshape(B, K, V) + run_score[:, :, None]).reshape(B, K * V)
        if sample:  # M draws without replacement, then in order of score (the first K may finish)
            drawn = jax.lax.top_k(logp + jax.random.gumbel(jax.random.fold_in(rng, t), logp.shape), M)[1]
            top_score, order = jax.lax.top_k(jnp.take_along_axis(logp, drawn, axis=1), M)  # [B, M]
            top_idx = jnp.take_along_axis(drawn, order, axis=1)
        else:
            top_score, top_idx = jax.lax.top_k(logp, M)  # [B, M]
        beam, tok = top_idx // V, top_idx % V
        top_seq = _take(run_seq, beam).at[:, :, t].set(tok)  # [B, M, N]
        ends = jnp.isin(tok, eos_ids) | (t + 1 >= N)  # [B, M]

        # The K best candidates that go on.
        alive = top_score + ends * NEG
        keep = jax.lax.top_k(alive, K)[1]  # [B, K]
        run_seq, run_score, run_beam = _take(top_seq, keep), _take(alive, keep), _take(beam, keep)

        # The K best finished hypotheses, old and new.
        done = ends & is_top
        cand = top_score / (t + 1).astype(jnp.float32) ** length_penalty
        if early_stopping is True:
            cand = cand + jnp.all(finished, axis=1, keepdims=True) * NEG
        cand = cand + ~hopeful * NEG + ~done * NEG
        pick = jax.lax.top_k(jnp.concatenate([score, cand], axis=1), K)[1]  # [B, K]
        seq = _take(jnp.concatenate([seq, top_seq], axis=1), pick)
        score = _take(jnp.concatenate([score, cand], axis=1), pick)
        finished = _take(jnp.concatenate([finished, done], axis=1), pick)

        # Could a running beam still beat the worst finished one? (transformers' heuristic)
        t = t + 1
        length = t.astype(jnp.float32)
        if early_stopping == "never":
            length = jnp.where(length_penalty > 0, jnp.float32(N), length)
        best = run_score[:, :1] / length ** length_penalty  # [B, 1]
        worst = jnp.where(finished, jnp.min(score, axis=1, keepdims=True), NEG)  # [B, K]
        hopeful = hopeful & jnp.any(best > worst, axis=1, keepdims=True)  # [B, 1]
        go = jnp.any(hopeful) & ~jnp.all(ends)
        if early_stopping is True:
            go = go & ~jnp.all(finished)

        def step(cache):
            rows = (jnp.arange(B)[:, None] * K + run_beam).reshape(B * K)  # each beam's parent row
            last = jax.lax.dynamic_slice_in_dim(run_seq, t - 1, 1, axis=2).reshape(B * K, 1)
            return decode(last, model.cache_rows(cache, rows))

        logits, cache = jax.lax.cond(go, step, lambda c: (logits, c), cache)
        return t, logits, cache, run_seq, run_score, seq, score, finished, hopeful, go

    run_seq = jnp.full((B, K, N), pad, jnp.int32)
    # Beam 0 alone starts, so the first step does not pick one token K times.
    run_score = jnp.zeros((B, K), jnp.float32).at[:, 1:].set(NEG)
    state = (jnp.int32(0), logits, cache, run_seq, run_score, run_seq, jnp.full((B, K), NEG, jnp.float32),
             jnp.zeros((B, K), bool), jnp.ones((B, 1), bool), jnp.bool_(True))
    _, _, _, _, _, seq, score, _, _, _ = jax.lax.while_loop(lambda s: s[-1], body, state)
    return seq, score
