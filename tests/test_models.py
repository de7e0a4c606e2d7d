"""Own GPT-2 / BLOOM vs transformers (PyTorch) on tiny random checkpoints, on CPU.

Run: .venv/bin/pytest tests/test_models.py -q
"""

from __future__ import annotations

import functools
import importlib
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lora_jax.models import (  # noqa: E402
    BloomConfig,
    beam_search,
    CausalLM,
    GPT2Config,
    convert_hf_state_dict,
    from_pretrained,
    generate,
    is_scanned,
    load_config,
    load_hf_state_dict,
    load_tokenizer,
    params_to_hf_state_dict,
    sample_logits,
    save_hf_checkpoint,
    stack_layers,
    unstack_layers,
)

TOL = 1e-4
PADS = (0, 3, 6)  # left padding per row of the test batch
T = 10


@pytest.fixture(scope="module")
def ckpt(tiny_gpt2_dir, tiny_bloom_dir):
    return {"gpt2": tiny_gpt2_dir, "bloom": tiny_bloom_dir}


@functools.cache
def hf_model(d: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()


@functools.cache
def jax_model(d: Path, scan: bool = False):
    return from_pretrained(d, scan_layers=scan)


@functools.partial(jax.jit, static_argnums=0)
def jit_apply(model, params, ids, mask):
    return model.apply(params, ids, mask)


def batch(pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompts [B, T] (ids avoid the special tokens 0..3) and their mask."""
    ids = np.random.RandomState(0).randint(4, 320, (len(PADS), T))
    mask = np.ones_like(ids)
    for b, p in enumerate(PADS):
        ids[b, :p], mask[b, :p] = pad_id, 0
    return ids, mask


def hf_logits(d: Path, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf_model(d)(torch.tensor(ids)).logits.numpy()


def assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("arch", ["gpt2", "bloom"])
def test_logits_match_transformers(ckpt, arch, scan):
    d = ckpt[arch]
    model, params = jax_model(d, scan)
    assert is_scanned(params) == scan
    ids, mask = batch(pad_id=0)
    # Unpadded batch: the whole [B, T, V] against transformers (no mask: the is_causal path;
    # an all-ones mask for the scanned variant saves a compile).
    full = np.asarray(jit_apply(model, params, ids, np.ones_like(mask) if scan else None))
    np.testing.assert_allclose(full, hf_logits(d, ids), atol=TOL, rtol=0)
    # Left-padded batch: each row's real positions equal transformers on the unpadded row.
    padded = np.asarray(jit_apply(model, params, ids, mask))
    assert np.isfinite(padded).all()
    for b, p in enumerate(PADS):
        ref = hf_logits(d, ids[b : b + 1, p:])[0]
        np.testing.assert_allclose(padded[b, p:], ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("arch", ["gpt2", "bloom"])
def test_packed_rows_match_transformers_per_sequence(ckpt, arch, scan):
    """Packed rows (segment_ids): every sequence's logits are transformers' on that sequence alone,
    whatever sits beside it; pads stay finite."""
    d = ckpt[arch]
    model, params = jax_model(d, scan)
    lengths = [[4, 7, 3], [14], [5, 5], []]  # per row; 16 slots, the rest padding (row 3 all padding)
    ids = np.random.RandomState(1).randint(4, 320, (len(lengths), 16)).astype(np.int32)
    seg = np.zeros_like(ids)
    for b, row in enumerate(lengths):
        seg[b, :sum(row)] = np.repeat(np.arange(1, len(row) + 1), row)
    out = np.asarray(jax.jit(functools.partial(model.apply, segment_ids=seg))(params, ids))
    assert np.isfinite(out).all()
    for b, row in enumerate(lengths):
        for start, n in zip(np.cumsum([0, *row[:-1]]), row):
            np.testing.assert_allclose(out[b, start:start + n], hf_logits(d, ids[b:b + 1, start:start + n])[0],
                                       atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="segment_ids replaces attention_mask"):
        model.apply(params, ids, seg > 0, segment_ids=seg)
    with pytest.raises(ValueError, match=r"segment_ids shape \(4, 15\)"):
        model.apply(params, ids, segment_ids=seg[:, 1:])


@pytest.mark.parametrize(
    "arch,scan", [("gpt2", False), ("bloom", False), ("bloom", True)], ids=["gpt2", "bloom", "bloom-scanned"]
)
def test_greedy_generation_matches_transformers(ckpt, arch, scan):
    d = ckpt[arch]
    model, params = jax_model(d, scan)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else model.config.eos_token_id
    ids, mask = batch(pad_id=pad)
    with torch.no_grad():
        ref = hf_model(d).generate(
            torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=20,
            do_sample=False, pad_token_id=pad,
        )[:, T:].numpy()
    out = generate(model.apply, params, ids, mask, model=model, max_new_tokens=20, pad_token_id=pad)
    assert out.shape == (len(PADS), 20)
    np.testing.assert_array_equal(np.asarray(out), ref)


def test_kv_cache_chunks_match_full_forward(ckpt):
    """Prefill in two chunks through the cache = one full forward (padding included)."""
    model, params = jax_model(ckpt["bloom"])
    ids, mask = batch(pad_id=3)

    @jax.jit
    def run(params, ids, mask):
        hidden = model.apply(params, ids, mask, return_hidden=True)  # [B, T, D]
        cache = model.init_cache(len(PADS), T + 2)
        a, cache = model.apply(params, ids[:, :7], mask[:, :7], cache=cache)
        b, cache = model.apply(params, ids[:, 7:], mask[:, 7:], cache=cache)
        return hidden, jnp.concatenate([a, b], axis=1), cache["index"]

    hidden, chunked, index = jax.tree.map(np.asarray, run(params, ids, mask))
    assert index == T and hidden.shape == (len(PADS), T, model.config.hidden_size)
    full = np.asarray(model.logits(params, hidden))  # [B, T, V]
    real = mask.astype(bool)
    np.testing.assert_allclose(full[0], hf_logits(ckpt["bloom"], ids[:1])[0], atol=TOL, rtol=0)
    np.testing.assert_allclose(chunked[real], full[real], atol=TOL, rtol=0)


@functools.cache
def gpt2_greedy(d: Path) -> np.ndarray:
    """8 greedy tokens of the tiny GPT-2 on the test batch, never stopping."""
    model, params = jax_model(d)
    ids, mask = batch(pad_id=0)
    return np.asarray(generate(model.apply, params, ids, mask, model=model, max_new_tokens=8,
                               eos_token_id=None, pad_token_id=0))


def test_generation_stops_at_eos_and_pads(ckpt):
    model, params = jax_model(ckpt["gpt2"])
    ids, mask = batch(pad_id=0)
    greedy = gpt2_greedy(ckpt["gpt2"])
    eos = int(greedy[0, 2])  # pretend the third token of row 0 is EOS
    pad = 1
    out = np.asarray(generate(model.apply, params, ids, mask, model=model, max_new_tokens=8,
                              eos_token_id=eos, pad_token_id=pad))

    def check(out, eos_ids):
        for row, ref in zip(out, greedy):
            hits = np.flatnonzero(np.isin(ref, eos_ids))
            stop = hits[0] + 1 if len(hits) else len(ref)
            np.testing.assert_array_equal(row[:stop], ref[:stop])
            assert (row[stop:] == pad).all()
    check(out, [eos])
    assert (out[0, 3:] == pad).all()
    # A config.json may list several EOS ids (transformers stops at any): kept as a tuple (the
    # model is a static, hashed argument of the compiled loop), and generate stops at each.
    two = [eos, int(greedy[1, 1])]
    listed = CausalLM(type(model.config).from_hf({**model.config.to_hf(), "eos_token_id": two}))
    assert listed.config.eos_token_id == tuple(two) and listed.config.to_hf()["eos_token_id"] == two
    out = np.asarray(generate(model.apply, params, ids, mask, model=listed, max_new_tokens=8, pad_token_id=pad))
    check(out, two)
    assert (out[1, 2:] == pad).all()


def test_sampling(ckpt):
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))  # [N, V]
    key = jax.random.key(0)
    counts = lambda t: np.bincount(np.asarray(t), minlength=4)  # noqa: E731
    assert set(np.flatnonzero(counts(sample_logits(logits, key, temperature=1.0, top_k=2)))) == {0, 1}
    assert set(np.flatnonzero(counts(sample_logits(logits, key, temperature=1.0, top_p=0.7)))) == {0, 1}
    assert set(np.flatnonzero(counts(sample_logits(logits, key, temperature=1.0, top_p=0.4)))) == {0}
    assert (counts(sample_logits(logits, key, temperature=1.0)) > 0).all()
    assert (np.asarray(sample_logits(logits, key)) == 0).all()  # temperature 0: greedy
    for off in (0, 4, 10**6):  # transformers: top_k 0 is off, one past the vocabulary keeps it all
        np.testing.assert_array_equal(sample_logits(logits, key, temperature=1.0, top_k=off),
                                      sample_logits(logits, key, temperature=1.0))

    model, params = jax_model(ckpt["gpt2"])
    ids, mask = batch(pad_id=0)
    kw = dict(model=model, max_new_tokens=8, eos_token_id=None)
    top1 = generate(model.apply, params, ids, mask, temperature=0.7, top_k=1, rng=jax.random.key(1), **kw)
    np.testing.assert_array_equal(top1, gpt2_greedy(ckpt["gpt2"]))
    # num_return_sequences draws rows b * n + i, as transformers lays them out
    three = generate(model.apply, params, ids, mask, temperature=0.7, top_k=1, rng=jax.random.key(1),
                     num_return_sequences=3, **kw)
    np.testing.assert_array_equal(three, np.repeat(gpt2_greedy(ckpt["gpt2"]), 3, axis=0))
    hot = np.asarray(generate(model.apply, params, ids, mask, temperature=2.0, rng=jax.random.key(2),
                              num_return_sequences=3, **kw)).reshape(len(ids), 3, -1)
    assert all(len({tuple(r) for r in rows}) > 1 for rows in hot)  # each prompt's draws differ
    # top_p 1 is off, as in transformers (a float32 cumsum would trim the tail): the same program.
    compiled = importlib.import_module("lora_jax.models.generate")._generate
    size = compiled._cache_size()
    same = generate(model.apply, params, ids, mask, temperature=2.0, top_p=1.0, rng=jax.random.key(2),
                    num_return_sequences=3, **kw)
    assert compiled._cache_size() == size
    np.testing.assert_array_equal(np.asarray(same).reshape(hot.shape), hot)
    with pytest.raises(ValueError, match="rng"):
        generate(model.apply, params, ids, mask, temperature=1.0, **kw)


def hf_beam_search(d: Path, ids, mask, **kw) -> tuple[np.ndarray, np.ndarray]:
    """transformers' beam search: (new tokens [B*n, L] cut where its longest answer ends, scores [B*n])."""
    with torch.no_grad():
        out = hf_model(d).generate(
            torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False, output_scores=True,
            return_dict_in_generate=True, **kw,
        )
    return out.sequences[:, T:].numpy(), out.sequences_scores.numpy()


# (arch, scanned, beams, returned, early_stopping, [length_penalty, ...]): beams, early_stopping and
# the model are compiled in; the length penalty and the EOS ids are traced, so each row compiles once.
BEAM_CASES = [
    ("gpt2", False, 3, 3, False, [1.0, 0.0, 2.0]),
    ("gpt2", False, 2, 1, True, [1.0]),
    ("gpt2", False, 2, 2, "never", [2.0, -1.0]),
    ("bloom", False, 3, 2, False, [1.0, -2.0]),
    ("bloom", True, 3, 3, "never", [0.5, -1.0]),
]


@pytest.mark.parametrize("arch,scan,beams,n,early,penalties", BEAM_CASES,
                         ids=[f"{a}{'-scanned' if s else ''}-{k}beams-{e}" for a, s, k, _, e, _ in BEAM_CASES])
def test_beam_search_matches_transformers(ckpt, arch, scan, beams, n, early, penalties):
    """Tokens and sequences_scores equal transformers' generate(num_beams=...) on left-padded prompts,
    with hypotheses that end early: the EOS ids are tokens the greedy answers pick."""
    d = ckpt[arch]
    model, params = jax_model(d, scan)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else model.config.eos_token_id
    ids, mask = batch(pad_id=pad)
    greedy = np.asarray(generate(model.apply, params, ids, mask, model=model, max_new_tokens=8,
                                 eos_token_id=None, pad_token_id=pad))
    eos = [int(greedy[0, 2]), int(greedy[1, 4])]
    # transformers fills finished hypotheses with `pad_token_id or eos[0]`: a nonzero pad for the test.
    fill = 5
    kw = dict(max_new_tokens=8, num_beams=beams, num_return_sequences=n, early_stopping=early,
              eos_token_id=eos, pad_token_id=fill)
    ended_early = 0
    for penalty in penalties:
        tokens, scores = beam_search(model.apply, params, ids, mask, model=model, length_penalty=penalty, **kw)
        assert tokens.shape == (len(PADS), n, 8) and scores.shape == (len(PADS), n)
        tokens, scores = np.asarray(tokens).reshape(-1, 8), np.asarray(scores).reshape(-1)
        ref, ref_scores = hf_beam_search(d, ids, mask, length_penalty=penalty, **kw)
        np.testing.assert_array_equal(tokens[:, :ref.shape[1]], ref)
        assert (tokens[:, ref.shape[1]:] == fill).all()
        np.testing.assert_allclose(scores, ref_scores, rtol=1e-6, atol=1e-4)
        ended_early += int(np.isin(tokens[:, :-1], eos).any())
    assert ended_early  # the search had finished hypotheses to rank, not only full-length ones
    best = generate(model.apply, params, ids, mask, model=model, length_penalty=penalties[-1], **kw)
    np.testing.assert_array_equal(np.asarray(best), tokens)


def test_beam_sampling(ckpt):
    """Beam sampling (num_beams > 1, temperature > 0): nearly cold, its draws are the best
    candidates, so it is beam search (scores / temperature); warm, the best hypothesis is
    distributed as transformers' generate(do_sample=True, num_beams=2) draws it (300 rows each;
    transformers >= 5.24, which ranks the drawn candidates by score again)."""
    d = ckpt["gpt2"]
    model, params = jax_model(d)
    ids, mask = batch(pad_id=0)
    kw = dict(model=model, max_new_tokens=6, num_beams=3, num_return_sequences=2)
    tokens, scores = beam_search(model.apply, params, ids, mask, **kw)
    cold, cold_scores = beam_search(model.apply, params, ids, mask, temperature=1e-3, rng=jax.random.key(0), **kw)
    np.testing.assert_array_equal(cold, tokens)
    np.testing.assert_allclose(np.asarray(cold_scores) * 1e-3, scores, rtol=1e-4)

    rows = 300
    prompt = np.repeat(ids[:1], rows, axis=0)  # row 0 has no pads
    warm = dict(max_new_tokens=1, num_beams=2, temperature=3.0, top_k=8)
    ours = np.asarray(generate(model.apply, params, prompt, np.ones_like(prompt), model=model,
                               rng=jax.random.key(1), **warm))[:, 0]
    torch.manual_seed(0)
    with torch.no_grad():
        ref = hf_model(d).generate(torch.tensor(prompt), attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                                   do_sample=True, **warm).numpy()[:, T]
    support = sorted(set(ours) | set(ref))
    assert 2 < len(support) <= 8  # top_k keeps 8 tokens; the best of 4 draws is not always the same one
    freq = lambda x: np.array([np.mean(x == t) for t in support])  # noqa: E731
    np.testing.assert_allclose(freq(ours), freq(ref), atol=0.1)


# (arch, num_beams, repetition_penalty, no_repeat_ngram_size, min_new_tokens)
PROCESSOR_CASES = [("gpt2", 1, 1.5, 2, 5), ("bloom", 1, None, 3, None), ("gpt2", 3, 0.8, 3, 4),
                   ("bloom", 2, 1.5, 1, 2)]


@pytest.mark.parametrize("arch,beams,penalty,ngram,min_new", PROCESSOR_CASES,
                         ids=[f"{c[0]}-{c[1]}beams" for c in PROCESSOR_CASES])
def test_logits_processors_match_transformers(ckpt, arch, beams, penalty, ngram, min_new):
    """repetition_penalty, no_repeat_ngram_size and min_new_tokens give transformers' tokens (and
    beam scores) row by row on the unpadded prompts, here on a left-padded batch: the pads are no
    part of a row's history (transformers would count them)."""
    d = ckpt[arch]
    model, params = jax_model(d)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else model.config.eos_token_id
    ids, mask = batch(pad_id=pad)
    plain = np.asarray(generate(model.apply, params, ids, mask, model=model, max_new_tokens=8, pad_token_id=pad))
    eos = int(plain[0, 1])  # row 0 would end after one token without min_new_tokens
    kw = dict(max_new_tokens=8, eos_token_id=eos, pad_token_id=5, repetition_penalty=penalty,
              no_repeat_ngram_size=ngram, min_new_tokens=min_new)
    if beams == 1:
        out = np.asarray(generate(model.apply, params, ids, mask, model=model, **kw))
        assert not np.array_equal(out, plain)
        top1 = generate(model.apply, params, ids, mask, model=model, temperature=0.5, top_k=1, rng=jax.random.key(0),
                        **kw)
        np.testing.assert_array_equal(top1, out)  # sampling sees the same processed logits
    else:
        out, scores = map(np.asarray, beam_search(model.apply, params, ids, mask, model=model, num_beams=beams, **kw))
        out, scores = out[:, 0], scores[:, 0]
    for b, p in enumerate(PADS):
        hf_kw = {k: v for k, v in kw.items() if v is not None}
        with torch.no_grad():
            ref = hf_model(d).generate(torch.tensor(ids[b:b + 1, p:]), do_sample=False, num_beams=beams,
                                       output_scores=True, return_dict_in_generate=True, **hf_kw)
        new = ref.sequences[0, T - p:].numpy()
        np.testing.assert_array_equal(out[b, :len(new)], new, err_msg=f"row {b}")
        assert (out[b, len(new):] == 5).all()
        if beams > 1:
            np.testing.assert_allclose(scores[b], ref.sequences_scores[0].numpy(), rtol=1e-6, atol=1e-4)
    if min_new:
        assert (out[:, :min_new] != eos).all()


def test_generation_refusals(ckpt):
    model, params = jax_model(ckpt["gpt2"])
    ids, mask = batch(pad_id=0)
    kw = dict(model=model, max_new_tokens=4)
    with pytest.raises(ValueError, match="num_return_sequences must be an int from 1 to num_beams=2, got 3"):
        beam_search(model.apply, params, ids, mask, num_beams=2, num_return_sequences=3, **kw)
    with pytest.raises(ValueError, match="early_stopping must be True, False or 'never', got 'always'"):
        beam_search(model.apply, params, ids, mask, num_beams=2, early_stopping="always", **kw)
    with pytest.raises(ValueError, match="num_beams must be a positive int, got 0"):
        beam_search(model.apply, params, ids, mask, num_beams=0, **kw)
    with pytest.raises(ValueError, match=r"sampling \(temperature > 0\) needs an rng"):
        generate(model.apply, params, ids, mask, num_beams=2, temperature=0.7, **kw)
    with pytest.raises(ValueError, match="num_return_sequences must be a positive int, and 1 for greedy generation"):
        generate(model.apply, params, ids, mask, num_return_sequences=2, **kw)
    # A row past the 64 learned positions is refused (it would read NaN rows); a left-padded one whose
    # real tokens fit gives the unpadded row's logits.
    long = np.arange(65, dtype=np.int32)[None] % 300
    with pytest.raises(ValueError, match=r"a row of 65 tokens exceeds this GPT-2's max_position_embeddings \(64"):
        model.apply(params, long)
    left = (np.arange(65) >= 5).astype(np.int32)[None]  # 5 pads, 60 real tokens
    np.testing.assert_allclose(model.apply(params, long, left)[:, 5:], model.apply(params, long[:, 5:]), atol=1e-5)
    # Packed sequences and cached steps are refused past the table too; a packed row of 65 whose
    # sequences fit is not.
    past = r"a sequence reaches position 64, past this GPT-2's max_position_embeddings \(64"
    with pytest.raises(ValueError, match=past):
        model.apply(params, long, segment_ids=np.ones_like(long))
    two = np.where(np.arange(65) < 60, 1, 2)[None]
    np.testing.assert_allclose(model.apply(params, long, segment_ids=two)[:, 60:], model.apply(params, long[:, 60:]),
                               atol=1e-5)
    _, cache = model.apply(params, long[:, :64], cache=model.init_cache(1, 66))
    with pytest.raises(ValueError, match=past):
        model.apply(params, long[:, 64:], cache=cache)
    # Token ids outside the vocabulary would read NaN rows too: refused where they are concrete.
    for bad in (320, -1):
        with pytest.raises(ValueError, match=f"token id {bad} is outside the vocabulary of 320 tokens"):
            model.apply(params, np.array([[5, bad, 7]]))
    # Positions count real tokens, and the last new token is never fed back: rows of 4 (row 2: 6
    # pads) fit 61 new tokens in 64 positions (as transformers generates them).
    assert generate(model.apply, params, ids[2:], mask[2:], **{**kw, "max_new_tokens": 61}).shape == (1, 61)
    # Under jit the real lengths are unknown: only the padded length is checked.
    traced = jax.jit(lambda i, m: generate(model.apply, params, i, m, **{**kw, "max_new_tokens": 61}))
    np.testing.assert_array_equal(traced(ids[2:], mask[2:]),
                                  generate(model.apply, params, ids[2:], mask[2:], **{**kw, "max_new_tokens": 61}))
    for bad, msg in [(dict(max_new_tokens=0), "max_new_tokens must be a positive int, got 0"),
                     (dict(max_new_tokens=56), r"a prompt of 10 tokens \+ max_new_tokens 56 exceeds the model's "
                                                "max_position_embeddings 64"),
                     (dict(repetition_penalty=0.0), "repetition_penalty must be a positive number, got 0.0"),
                     (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size must be an int >= 0, got -1"),
                     (dict(min_new_tokens=1.5), "min_new_tokens must be an int >= 0, got 1.5")]:
        with pytest.raises(ValueError, match=msg):
            generate(model.apply, params, ids, mask, **{**kw, **bad})
        with pytest.raises(ValueError, match=msg):
            beam_search(model.apply, params, ids, mask, num_beams=2, **{**kw, **bad})
    right = np.concatenate([mask[:, 1:], np.zeros_like(mask[:, :1])], axis=1)  # row 0 (no pads) now ends in a pad
    for bad, msg in [(dict(attention_mask=mask[:, 1:]), r"attention_mask \(3, 9\) and input_ids \(3, 10\) differ"),
                     (dict(attention_mask=right), "prompt row 0 is right-padded .* needs left padding")]:
        for fn in (generate, functools.partial(beam_search, num_beams=2)):
            with pytest.raises(ValueError, match=msg):
                fn(model.apply, params, ids, **{**kw, **bad})
    for bad, msg in [(dict(temperature=-1.0), r"temperature must be a number >= 0 \(0: greedy\), got -1.0"),
                     (dict(top_k=-2), r"top_k must be an int >= 0 \(0: off\), got -2"),
                     (dict(top_p=1.5), r"top_p must be a number in \(0, 1\], got 1.5")]:
        with pytest.raises(ValueError, match=msg):
            generate(model.apply, params, ids, mask, rng=jax.random.key(0), **{**kw, "temperature": 1.0, **bad})


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize("arch", ["gpt2", "bloom"])
def test_pytorch_bin_loads_same_params(ckpt, arch, tmp_path):
    # transformers 5 ignores save_pretrained(safe_serialization=False) and always writes
    # safetensors, so write the legacy file the way transformers 4 did: torch.save(state_dict).
    torch.save(hf_model(ckpt[arch]).state_dict(), tmp_path / "pytorch_model.bin")
    shutil.copy(ckpt[arch] / "config.json", tmp_path / "config.json")
    _, params = from_pretrained(tmp_path)
    assert_tree_equal(params, jax_model(ckpt[arch])[1])


def test_sharded_safetensors(ckpt, tmp_path):
    hf_model(ckpt["gpt2"]).save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    _, params = from_pretrained(tmp_path)
    assert_tree_equal(params, jax_model(ckpt["gpt2"])[1])


def test_single_file_wins_over_a_stale_shard_index(ckpt, tmp_path):
    """Saving unsharded over a sharded checkpoint leaves the old index (and shards) behind: the new
    `model.safetensors` is what loads, in transformers and here (not the stale shards)."""
    hf_model(ckpt["gpt2"]).save_pretrained(tmp_path, max_shard_size="40KB")
    model, params = jax_model(ckpt["gpt2"])
    halved = jax.tree.map(lambda x: x / 2, params)
    save_hf_checkpoint(tmp_path, model.config, halved)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    _, loaded = from_pretrained(tmp_path)
    assert_tree_equal(loaded, halved)
    ids = batch(0)[0]
    with torch.no_grad():
        ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()(
            torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(jit_apply(model, loaded, ids, None), ref, atol=TOL, rtol=TOL)


def test_save_and_load_expand_home(ckpt, tmp_path, monkeypatch):
    """`~/x` names the same directory when saving and loading (not a literal `./~/x` for one of them)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    model, params = jax_model(ckpt["gpt2"])
    save_hf_checkpoint("~/saved", model.config, params)
    assert (tmp_path / "home" / "saved" / "model.safetensors").is_file() and not (tmp_path / "~").exists()
    assert_tree_equal(convert_hf_state_dict(model.config, load_hf_state_dict("~/saved")), params)
    assert_tree_equal(from_pretrained("~/saved")[1], params)


def test_hub_cache_layout_offline(ckpt, tmp_path, monkeypatch):
    """A hub id resolves to HF_HUB_CACHE/models--org--name/snapshots/<rev>/ with no network.

    The weights are written with bigscience's key names (no `transformer.` prefix) plus a tied
    `lm_head.weight`, as published BLOOM checkpoints are."""
    from safetensors.numpy import save_file

    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-bloom"
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    for f in ckpt["bloom"].iterdir():
        if f.suffix == ".json":
            shutil.copy(f, snap / f.name)
    state = load_hf_state_dict(ckpt["bloom"])
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    state["lm_head.weight"] = state["word_embeddings.weight"]
    save_file(state, snap / "model.safetensors")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    model, params = from_pretrained("tiny-org/tiny-bloom")
    assert_tree_equal(params, jax_model(ckpt["bloom"])[1])
    assert load_config("tiny-org/tiny-bloom") == model.config
    tok = load_tokenizer("tiny-org/tiny-bloom")
    assert tok.eos_token_id == model.config.eos_token_id == 2
    with pytest.raises(FileNotFoundError, match="tiny-org/missing"):
        from_pretrained("tiny-org/missing")

    # revision=: a tag through refs/<tag>, or a commit hash naming its snapshot; main stays the default
    rev2 = "fedcba9876543210fedcba9876543210fedcba98"
    other = repo / "snapshots" / rev2
    shutil.copytree(snap, other)
    hf = json.loads((other / "config.json").read_text())
    hf.pop("torch_dtype", None)
    (other / "config.json").write_text(json.dumps(hf | {"dtype": "bfloat16"}))
    save_file({k: v * 2 for k, v in state.items()}, other / "model.safetensors")
    (repo / "refs" / "v2").write_text(rev2)
    (repo / "snapshots" / rev).touch()  # main's snapshot is no longer the newest: refs/main must decide
    doubled = jax.tree.map(lambda x: (x.astype(jnp.float32) * 2).astype(jnp.bfloat16), params)
    for hub in ("huggingface_hub", "our own cache lookup"):
        if hub != "huggingface_hub":  # as without huggingface_hub installed
            import huggingface_hub

            monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: 1 / 0)
        assert_tree_equal(from_pretrained("tiny-org/tiny-bloom")[1], params)
        for r in ("v2", rev2):
            m2, p2 = from_pretrained("tiny-org/tiny-bloom", revision=r, dtype="auto")
            assert m2.config.param_dtype == jnp.bfloat16, hub
            assert_tree_equal(p2, doubled)
        assert load_config("tiny-org/tiny-bloom", revision=rev2, param_dtype="auto").param_dtype == jnp.bfloat16
        assert load_tokenizer("tiny-org/tiny-bloom", revision="v2").eos_token_id == 2
        with pytest.raises(FileNotFoundError, match="'tiny-org/tiny-bloom' at revision 'v3'"):
            from_pretrained("tiny-org/tiny-bloom", revision="v3")
    with pytest.raises(ValueError, match="revision='v2' names a hub revision, but .* is a local directory"):
        from_pretrained(snap, revision="v2")


@pytest.mark.parametrize("arch", ["gpt2", "bloom"])
def test_positions_run_the_last_layer_on_their_rows_only(ckpt, arch):
    """`positions` [B, K] (the loss's rows, a classifier's pooled row, a prefill's last token): the
    last layer runs attention, output projection and MLP for those K rows alone, with the outputs,
    the cache and a LoRA loss's adapter gradients of the full forward, over left padding and packed
    rows (a scanned stack takes the rows after its last layer: the scanned generation tests); the
    compiled step skips the last layer's per-row work for the other T - K."""
    import lora_jax as lj
    from lora_jax.models.common import take_rows
    from train.loop import target_loss

    model, params = jax_model(ckpt[arch])
    cfg = model.config
    ids, mask = batch(pad_id=3)
    pos = jnp.asarray([[9, 4], [9, 5], [7, 8]])  # [B, K=2] real tokens of each row
    seg = jnp.asarray([[1] * 4 + [2] * 6, [1] * 10, [1] * 8 + [0] * 2])
    full, hidden = jax.jit(lambda p: (model.apply(p, ids, mask), model.apply(p, ids, segment_ids=seg,
                                                                             return_hidden=True)))(params)

    @functools.partial(jax.jit, static_argnums=1)
    def trimmed(p, trim):
        logits = model.apply(p, ids, mask, positions=pos, trim_last_layer=trim)  # [B, K, V]
        packed = model.apply(p, ids, segment_ids=seg, positions=pos, return_hidden=True, trim_last_layer=trim)
        last, cache = model.apply(p, ids, mask, cache=model.init_cache(3, T + 2), positions=pos[:, :1],
                                  trim_last_layer=trim)
        return logits, packed, last, cache

    (logits, packed, last, cache), untrimmed = trimmed(params, True), trimmed(params, False)
    np.testing.assert_allclose(logits, take_rows(full, pos), atol=TOL, rtol=0)
    np.testing.assert_allclose(packed, take_rows(hidden, pos), atol=TOL, rtol=0)
    np.testing.assert_allclose(last, take_rows(full, pos[:, :1]), atol=TOL, rtol=0)
    for u, v in zip(jax.tree.leaves((logits, packed, last, cache)), jax.tree.leaves(untrimmed)):
        np.testing.assert_allclose(u, v, atol=TOL, rtol=0)  # the cache's keys and values: every row

    # A LoRA loss on K rows: the adapter gradients of the untrimmed step, and fewer FLOPs: at
    # least the last layer's output projection and MLP on the B * (T - K) other rows, forward.
    mlp = "c_fc" if arch == "gpt2" else "dense_h_to_4h"
    lora = lj.LoraConfig(rank=2, alpha=4, targets=[mlp, "c_attn" if arch == "gpt2" else "query_key_value"])
    adapters = jax.tree.map(lambda x: x + 0.1, lj.init(lora, params, jax.random.key(0)))
    g = lj.apply(model.apply, lora)
    loss_batch = dict(input_ids=ids, attention_mask=mask, labels=np.roll(ids, -1, 1),
                      loss_mask=np.zeros(ids.shape, np.float32) + (np.arange(T) >= T - 2))

    def grad_fn(trim):
        loss = target_loss(lambda p, a, i, m, rng, k: g(p, a, i, m, positions=k, trim_last_layer=trim), 2)
        return jax.jit(jax.grad(lambda a: loss(params, a, loss_batch, None)[0]))

    (g1, c1), (g2, c2) = ((f(adapters), f.lower(adapters).compile().cost_analysis()["flops"])
                          for f in (grad_fn(True), grad_fn(False)))
    for u, v in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(u, v, atol=1e-5, rtol=1e-4)
    D, F = cfg.hidden_size, cfg.intermediate_size
    assert c2 - c1 >= 2 * len(PADS) * (T - 2) * (D * D + 2 * D * F)
    with pytest.raises(ValueError, match="trim_last_layer=False"):  # aLoRA's per-token mask spans all T
        g(params, adapters, ids, mask, positions=pos, lora_mask=np.ones(ids.shape, bool))
    assert g(params, adapters, ids, mask, positions=pos, lora_mask=np.ones(ids.shape, bool),
             trim_last_layer=False).shape == logits.shape


def test_token_nll_is_autodiffs_loss_in_one_backward_pass():
    """`train.loop.token_nll` (the job's and the benchmark's per-token loss) has autodiff's value and
    gradient, in fp32 and bf16, with -inf padding columns; its backward is one elementwise pass:
    no scatter of the label term, and fewer bytes accessed than autodiff's for the GPT-2 head."""
    from train.loop import token_nll

    def autodiff(logits, labels):
        lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
        return lse - jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0].astype(jnp.float32)

    labels = jax.random.randint(jax.random.key(1), (3, 5), 0, 100)
    w = jax.random.uniform(jax.random.key(2), (3, 5))
    for dtype, tol in ((jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)):
        logits = (3 * jax.random.normal(jax.random.key(0), (3, 5, 128))).astype(dtype).at[..., 100:].set(-jnp.inf)
        (a, ga), (b, gb) = (jax.jit(jax.value_and_grad(lambda x, f=f: jnp.sum(f(x, labels) * w)))(logits)
                            for f in (token_nll, autodiff))
        np.testing.assert_allclose(a, b, rtol=1e-6)
        assert ga.dtype == dtype and not jnp.any(ga[..., 100:])
        np.testing.assert_allclose(np.asarray(ga, np.float32), np.asarray(gb, np.float32), atol=tol)

    h = jax.ShapeDtypeStruct((2, 128, 768), jnp.bfloat16)
    wte = jax.ShapeDtypeStruct((50304, 768), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((2, 128), jnp.int32)
    bytes_accessed = {}
    for f in (token_nll, autodiff):
        lowered = jax.jit(jax.grad(lambda h, w, l, f=f: jnp.sum(f(h @ w.T, l)), argnums=(0, 1))).lower(h, wte, ids)
        assert ("scatter" in lowered.as_text()) == (f is autodiff)
        bytes_accessed[f] = lowered.compile().cost_analysis()["bytes accessed"]
    assert bytes_accessed[token_nll] < 0.9 * bytes_accessed[autodiff]  # 0.83 with jax 0.10


def test_key_bias_folded_into_the_head_dims():
    """cuDNN's branch folds BLOOM's per-key ALiBi bias into 8 more head dims instead of passing a
    [B, H, T, S] bias: the same attention and q/k/v gradients (fp32), and in bf16 closer to the
    fp32 result than a bf16 bias is (the bias / scale kept as a high and a low bf16 part)."""
    from lora_jax.models.bloom import alibi_bias
    from lora_jax.models.common import fold_key_bias

    B, T, H, D = 2, 512, 4, 64
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(kk, (B, T, H, D)) for kk in (k1, k2, k3))
    bias = alibi_bias(H, jnp.broadcast_to(jnp.arange(T), (B, T)))  # [B, H, 1, S], up to 0.25 * 511
    scale = D ** -0.5
    attend = lambda q, k, v, b=None: jax.nn.dot_product_attention(  # noqa: E731
        q, k, v, bias=b, scale=scale, is_causal=True, implementation="xla")

    def folded(q, k, v):
        out = attend(*fold_key_bias(q, k, v, bias, scale))
        assert out.shape == (B, T, H, D + 8) and not jnp.any(out[..., D:])
        return out[..., :D]
    np.testing.assert_allclose(folded(q, k, v), attend(q, k, v, bias), atol=2e-5)
    cot = jax.random.normal(jax.random.key(1), (B, T, H, D))
    grads = [jax.vjp(f, q, k, v)[1](cot) for f in (folded, lambda *a: attend(*a, bias))]
    for u, w in zip(*grads):
        np.testing.assert_allclose(u, w, atol=2e-4)

    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    exact = attend(*[x.astype(jnp.float32) for x in bf], bias)
    err = lambda y: np.max(np.abs(np.asarray(y, np.float32) - np.asarray(exact)))  # noqa: E731 (numpy: NaN counts)
    assert err(folded(*bf)) < 0.5 * err(attend(*bf, bias.astype(jnp.bfloat16)))

    # fp16, with bias / scale past fp16's range (as ALiBi over a long context gets): still close
    bias = bias * 100  # up to 12775; / scale ~ 1e5 > 65504
    h = [x.astype(jnp.float16) for x in (q, k, v)]
    exact = attend(*[x.astype(jnp.float32) for x in h], bias)
    assert err(folded(*h)) < 0.01
    with pytest.raises(ValueError, match=r"per-key bias \[B\|1, 4, 1, 512\], got \(2, 4, 512, 512\)"):
        fold_key_bias(q, k, v, jnp.broadcast_to(bias, (B, H, T, T)), scale)


def test_auto_dtype():
    """dtype="auto" as transformers reads it: the config's dtype (or torch_dtype), else the first
    floating tensor's, else float32; a dtype it cannot hold is an error naming the key."""
    from lora_jax.models.hf import auto_dtype

    bf16, ints = np.zeros(2, jnp.bfloat16), np.zeros(2, np.int64)
    assert auto_dtype({"dtype": "float32"}, {"w": bf16}) == jnp.float32
    assert auto_dtype({"torch_dtype": "torch.float16"}) == jnp.float16
    assert auto_dtype({}, {"i": ints, "w": bf16}) == jnp.bfloat16
    assert auto_dtype({}) == jnp.float32
    with pytest.raises(ValueError, match="torch_dtype='int8'"):
        auto_dtype({"torch_dtype": "int8"})


def test_gpt2_keys_without_prefix_and_buffers(ckpt):
    model, params = jax_model(ckpt["gpt2"])
    state = {k.removeprefix("transformer."): v for k, v in load_hf_state_dict(ckpt["gpt2"]).items()}
    tri = np.tril(np.ones((64, 64), bool))[None, None]
    for i in range(model.config.num_layers):  # old checkpoints carry the causal-mask buffers
        state[f"h.{i}.attn.bias"], state[f"h.{i}.attn.masked_bias"] = tri, np.float32(-1e4)
    state["lm_head.weight"] = state["wte.weight"]
    assert_tree_equal(convert_hf_state_dict(model.config, state), params)


def test_clear_errors(ckpt):
    with pytest.raises(ValueError, match="'llama'"):
        load_config({"model_type": "llama", "hidden_size": 8})
    cfg = load_config(ckpt["bloom"])
    good = load_hf_state_dict(ckpt["bloom"])
    key = "transformer.h.1.self_attention.query_key_value.weight"
    missing = {k: v for k, v in good.items() if k != key}
    with pytest.raises(ValueError, match=r"missing \(1\): " + key.replace(".", r"\.")):
        convert_hf_state_dict(cfg, missing)
    with pytest.raises(ValueError, match=r"unexpected \(1\): transformer\.h\.0\.extra\.weight"):
        convert_hf_state_dict(cfg, {**good, "transformer.h.0.extra.weight": np.zeros(3)})
    with pytest.raises(ValueError, match=r"unexpected \(1\): transformer\.h\.7\.mlp"):
        convert_hf_state_dict(cfg, {**good, "transformer.h.7.mlp.dense_h_to_4h.bias": np.zeros(192)})
    with pytest.raises(ValueError, match=key.replace(".", r"\.") + r": got \(144, 47\), expected \(144, 48\)"):
        convert_hf_state_dict(cfg, {**good, key: good[key][:, :47]})
    scb = key.removesuffix(".weight") + ".SCB"  # a bitsandbytes 8-bit weight's row absmax, of the wrong length
    with pytest.raises(ValueError, match=scb.replace(".", r"\.") + r" \(143,\): an 8-bit weight's row absmax without"):
        convert_hf_state_dict(cfg, {**good, key: good[key].astype(np.int8), scb: np.ones(143, np.float32)})
    untied = {**good, "lm_head.weight": good["transformer.word_embeddings.weight"] + 1}
    with pytest.raises(ValueError, match="lm_head.weight"):
        convert_hf_state_dict(cfg, untied)


def test_a_directory_without_config_is_named(tmp_path):
    """A local directory that holds no config.json (or no tokenizer) is named, not looked up on the hub."""
    (tmp_path / "model.safetensors").write_bytes(b"")
    for load in (load_config, from_pretrained):
        with pytest.raises(FileNotFoundError, match=f"^{tmp_path}: no config.json there"):
            load(tmp_path)
    with pytest.raises(ValueError, match=f"^{tmp_path}: no tokenizer could be loaded from there"):
        load_tokenizer(tmp_path)


# ----------------------------------------------------------------------------- export, layout


@pytest.mark.parametrize("arch", ["gpt2", "bloom"])
def test_export_roundtrip_through_transformers(ckpt, arch, tmp_path):
    d = ckpt[arch]
    model, params = jax_model(d, True)  # scanned params export as unrolled HF tensors
    state = params_to_hf_state_dict(model.config, params)
    ref = {k: v.numpy() for k, v in hf_model(d).state_dict().items() if k in state}
    assert set(ref) == set(state)
    for k in ref:
        np.testing.assert_array_equal(state[k], ref[k], err_msg=k)
    save_hf_checkpoint(tmp_path, model.config, params)
    back, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = batch(0)[0]
    with torch.no_grad():
        np.testing.assert_array_equal(back.eval()(torch.tensor(ids)).logits.numpy(), hf_logits(d, ids))
    assert load_config(tmp_path) == model.config.replace(scan_layers=False)


@pytest.mark.parametrize("arch", ["gpt2", "bloom"])
def test_layouts_and_init(ckpt, arch):
    model, params = jax_model(ckpt[arch])
    cfg = model.config
    shapes = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), t)  # noqa: E731
    assert shapes(model.param_shapes()) == shapes(params)
    scanned = stack_layers(params)
    assert shapes(CausalLM(cfg.replace(scan_layers=True)).param_shapes()) == shapes(scanned)
    assert_tree_equal(unstack_layers(scanned), params)
    L, D = cfg.num_layers, cfg.hidden_size
    if arch == "gpt2":
        assert scanned["transformer"]["h"]["attn"]["c_attn"]["kernel"].shape == (L, D, 3 * D)
        assert params["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"].shape == (D, 3 * D)
        assert params["transformer"]["wpe"]["embedding"].shape == (64, D)
    else:
        qkv = scanned["transformer"]["h"]["self_attention"]["query_key_value"]["kernel"]
        assert qkv.shape == (L, D, 3 * D)
        assert params["transformer"]["word_embeddings_layernorm"]["scale"].shape == (D,)
    # A real (compiled) init once; shapes only for BLOOM.
    init = functools.partial(model.init_params, dtype=jnp.bfloat16)
    p16 = (init if arch == "gpt2" else functools.partial(jax.eval_shape, init))(jax.random.key(0))
    assert shapes(p16) == jax.tree.map(lambda x: (x.shape, jnp.dtype(jnp.bfloat16)), params)
    assert type(params) is dict and type(params["transformer"]["h"]) is dict


def test_bf16_scan_remat_grad(ckpt):
    """bf16 params + compute, scanned, remat with a policy: close to fp32, differentiable."""
    d = ckpt["bloom"]
    model, params = from_pretrained(d, dtype=jnp.bfloat16, scan_layers=True, remat=True,
                                    remat_policy="dots_saveable")
    assert model.config.dtype == jnp.bfloat16
    ids, mask = batch(pad_id=3)

    def loss(p):
        logits = model.apply(p, ids, mask)
        assert logits.dtype == jnp.bfloat16
        return jnp.mean(logits.astype(jnp.float32) ** 2), logits

    grads, logits = jax.jit(jax.grad(loss, has_aux=True))(params)
    ref = np.asarray(jit_apply(*jax_model(d), ids, mask))
    real = mask.astype(bool)
    err = np.abs(np.asarray(logits, np.float32)[real] - ref[real]).max()
    assert err < 0.05 * np.abs(ref).max()
    assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in jax.tree.leaves(grads))


def test_dropout_needs_rng_and_changes_output(ckpt):
    model, params = jax_model(ckpt["gpt2"])  # GPT-2 has resid/embd dropout 0.1
    ids = batch(0)[0]
    with pytest.raises(ValueError, match="rng"):
        model.apply(params, ids, deterministic=False)
    train = jax.jit(functools.partial(model.apply, deterministic=False))(params, ids, rng=jax.random.key(0))
    assert not np.allclose(train, jit_apply(model, params, ids, None))


# ----------------------------------------------------------------------------- configs


def test_configs_presets_and_hf_round_trip():
    assert sum(x.size for x in jax.tree.leaves(CausalLM(GPT2Config.preset("gpt2")).param_shapes())) == 124_439_808
    bloom = CausalLM(BloomConfig.preset("bigscience/bloom-560m"))
    assert sum(x.size for x in jax.tree.leaves(bloom.param_shapes())) == 559_214_592
    for name in ("distilgpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        assert GPT2Config.preset(name).head_dim == 64
    for name in ("bloom-1b1", "bloom-1b7", "bloom-3b", "bloom-7b1", "bloomz-560m", "bloomz-7b1"):
        assert BloomConfig.preset(name).vocab_size == 250880
    # bigscience/bloom-560m's config.json spells the sizes with aliases.
    hf = {"model_type": "bloom", "n_embed": 1024, "n_layer": 24, "num_attention_heads": 16,
          "vocab_size": 250880, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
    cfg = load_config(hf)
    assert cfg == BloomConfig.preset("bloom-560m")
    assert hash(cfg) == hash(BloomConfig.preset("bloom-560m"))
    again = load_config(json.loads(json.dumps(cfg.to_hf())))
    assert again == cfg and again.to_hf()["n_embed"] == 1024
    assert load_config(hf, param_dtype="bfloat16").param_dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="remat_policy"):
        load_config(hf, remat_policy="nope")
    # Configs transformers computes otherwise are refused by name, not loaded to other logits.
    assert load_config({**hf, "slow_but_exact": True}) == cfg  # pretraining_tp 1: one slice, biases kept
    with pytest.raises(ValueError, match=r"slow_but_exact=True with pretraining_tp=4 is not supported"):
        load_config({**hf, "slow_but_exact": True, "pretraining_tp": 4})
    assert load_config({**hf, "pretraining_tp": 4}) == cfg  # without slow_but_exact: one F.linear, as here
    gpt2 = GPT2Config.preset("gpt2").to_hf()
    for bad, msg in [({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True"),
                     ({"tie_word_embeddings": False}, r"untied LM heads are not supported")]:
        with pytest.raises(ValueError, match=msg):
            load_config({**gpt2, **bad})


def test_padded_vocabulary_leaves_the_training_loss_unchanged():
    """`vocab_multiple` pads the head's vocabulary axis with -inf logits (an aligned GPU matmul):
    the real columns are the unpadded logits, and `target_loss` and its gradients are the same for
    LoRA (with an adapted embedding table, which stays factored under strict) and for full
    fine-tuning."""
    import lora_jax as lj
    from train.loop import target_loss

    model = CausalLM(GPT2Config(vocab_size=100, hidden_size=32, num_layers=1, num_heads=2,
                                intermediate_size=64, max_position_embeddings=16))
    params = model.init_params(jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (2, 8), 0, 100)
    padded = model.apply(params, ids, vocab_multiple=64)
    assert padded.shape == (2, 8, 128) and bool(jnp.all(padded[..., 100:] == -jnp.inf))
    np.testing.assert_allclose(padded[..., :100], model.apply(params, ids), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="vocab_multiple"):
        model.apply(params, ids, vocab_multiple=0)

    batch = dict(input_ids=ids, labels=jnp.roll(ids, -1, axis=1), attention_mask=jnp.ones_like(ids),
                 loss_mask=jnp.ones(ids.shape, jnp.float32).at[:, -1].set(0))
    config = lj.LoraConfig(rank=2, alpha=4, targets=["c_attn", "wte"])  # the tied head adapted too
    leaves, treedef = jax.tree.flatten(lj.init(config, params, jax.random.key(2)))
    adapters = jax.tree.unflatten(treedef, [x + 0.1 for x in leaves])
    g = lj.apply(model.apply, config, strict=True)
    np.testing.assert_allclose(g(params, adapters, ids, vocab_multiple=64)[..., :100], g(params, adapters, ids),
                               rtol=1e-5, atol=1e-5)

    def loss(m):
        return target_loss(lambda p, a, i, mask, rng, pos: g(p, a, i, mask, positions=pos, vocab_multiple=m), 8)
    (l1, n1), g1 = jax.jit(jax.value_and_grad(loss(1), argnums=1, has_aux=True))(params, adapters, batch, None)
    (l2, n2), g2 = jax.jit(jax.value_and_grad(loss(64), argnums=1, has_aux=True))(params, adapters, batch, None)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    assert n1 == n2
    for u, v in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6)
    full = lambda m: target_loss(  # noqa: E731
        lambda p, a, i, mask, rng, pos: model.apply(p, i, mask, positions=pos, vocab_multiple=m), 8)
    (l1, _), g1 = jax.jit(jax.value_and_grad(full(1), has_aux=True))(params, None, batch, None)
    (l2, _), g2 = jax.jit(jax.value_and_grad(full(64), has_aux=True))(params, None, batch, None)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for u, v in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6)
