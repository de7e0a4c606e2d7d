"""Beam sampling's warpers keep 1 + #EOS ids tokens per beam, as transformers' do.

transformers (`_get_logits_processor`) applies top-k / top-p under beam sampling with
`min_tokens_to_keep = len(eos_token_ids) + 1`, so that every beam keeps a continuation that does
not end. With two EOS ids that are the two likeliest first tokens and top_k=1 (or a tiny top_p),
each beam keeps its three best tokens: the EOS pair and one that goes on. The only real beam's
three kept tokens are drawn at every step whatever the seed (the other draws have probability 0
and scores near -1e9, below every real candidate), so transformers' answer is deterministic: two
hypotheses that go on past the EOS pair. Keeping 2 tokens (the old code) left only the EOS pair
finite: the running beams were EOS-ended candidates scored about -1e9, the search stopped after
one step, and it returned the two one-token EOS hypotheses instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lora_jax.models import beam_search, from_pretrained  # noqa: E402


@pytest.mark.parametrize("warper", [dict(top_k=1), dict(top_k=0, top_p=0.01)], ids=["top_k", "top_p"])
def test_beam_sampling_keeps_a_running_beam_past_two_eos_ids(tiny_gpt2_dir, warper):
    d = tiny_gpt2_dir
    model, params = from_pretrained(d)
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    prompt = np.random.RandomState(0).randint(4, 320, (1, 6))
    with torch.no_grad():
        first = hf(torch.tensor(prompt)).logits[0, -1].numpy()
    eos = [int(t) for t in np.argsort(-first)[:2]]  # the two likeliest first tokens end
    fill, N = 5, 4
    # "never" with length_penalty > 0: the search goes on while a running beam's score over N**2
    # could beat the worst finished one, so a running beam past the EOS pair shows in the answer.
    kw = dict(max_new_tokens=N, num_beams=2, num_return_sequences=2, early_stopping="never",
              length_penalty=2.0, eos_token_id=eos, pad_token_id=fill, temperature=1.0, **warper)

    refs = set()
    for seed in range(3):
        torch.manual_seed(seed)
        with torch.no_grad():
            out = hf.generate(torch.tensor(prompt), attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                              do_sample=True, output_scores=True, return_dict_in_generate=True, **kw)
        ref = out.sequences[:, prompt.shape[1]:].numpy()
        ref = np.pad(ref, ((0, 0), (0, N - ref.shape[1])), constant_values=fill)
        ref_scores = out.sequences_scores.numpy()
        refs.add((ref.tobytes(), ref_scores.round(4).tobytes()))
    assert len(refs) == 1  # transformers' beam sampling is deterministic here
    assert not np.isin(ref[:, 0], eos).any()  # its hypotheses go on past the EOS pair

    for seed in range(3):
        tokens, scores = beam_search(model.apply, params, jnp.asarray(prompt), model=model,
                                     rng=jax.random.key(seed), **kw)
        np.testing.assert_array_equal(np.asarray(tokens[0]), ref)
        np.testing.assert_allclose(np.asarray(scores[0]), ref_scores, rtol=1e-5, atol=1e-5)
