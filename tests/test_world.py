"""The embedded offline world: deterministic, answers are spans, no entity leaks into validation."""

import json
import re
import string

import pytest
from transformers import AutoTokenizer

from train.data import format_prompt, load_split, load_squad_file
from train.make_assets import asset_files
from train.world import (EOS, QUESTIONS, SENTENCES, WORLD_DATA_DIR, WORLD_MODEL_DIR, WorldConfig, dumps_squad,
                         make_world)

SMALL = WorldConfig(seed=3, train_contexts=40, validation_contexts=10, corpus_documents=50)


def test_same_seed_same_bytes_other_seed_other_bytes():
    a, b = make_world(SMALL), make_world(SMALL)
    assert dumps_squad(a.train) == dumps_squad(b.train) and a.corpus == b.corpus
    c = make_world(WorldConfig(seed=4, train_contexts=40, validation_contexts=10, corpus_documents=50))
    assert dumps_squad(c.train) != dumps_squad(a.train)


def test_committed_assets_are_what_the_script_generates():
    stale = [p for p, text in asset_files().items() if not p.is_file() or p.read_text(encoding="utf-8") != text]
    assert not stale, (f"regenerate with `python -m train.make_assets` (and, if the tokenizer changed, retrain "
                       f"with `python -m train.pretrain_world`): {stale}")


def test_committed_model_matches_the_tokenizer():
    config_path = WORLD_MODEL_DIR / "config.json"
    if not config_path.is_file():
        pytest.skip("no pretrained world model committed yet")
    config = json.loads(config_path.read_text())
    tok = AutoTokenizer.from_pretrained(str(WORLD_MODEL_DIR))
    assert config["model_type"] == "gpt2" and config["vocab_size"] == len(tok)
    assert config["eos_token_id"] == config["bos_token_id"] == tok.eos_token_id
    assert config["n_positions"] >= 192  # the longest world example is ~130 tokens
    assert (WORLD_MODEL_DIR / "model.safetensors").stat().st_size < 8e6  # keep the repo small


@pytest.mark.parametrize("split, lo, hi", [("train", 2800, 3200), ("validation", 180, 240)])
def test_every_answer_is_a_span_at_answer_start(split, lo, hi):
    res = load_squad_file(WORLD_DATA_DIR / f"{split}.json")
    assert res.num_skipped == 0 and res.repaired == 0  # nothing needed fixing or dropping
    assert lo <= len(res.records) <= hi
    for r in res.records:
        for a, s in zip(r.answers, r.answer_starts):
            assert r.context[s : s + len(a)] == a


def test_v2_adds_one_unanswerable_question_per_context():
    """The SQuAD v2.0 world: the v1.1 contexts and questions, plus one question per context about a
    fact of its subject that no sentence states (the v1.1 assets are what they were)."""
    world = make_world(SMALL)
    for v1, v2 in ((world.train, world.train_v2), (world.validation, world.validation_v2)):
        assert v2["version"] == "v2.0" and len(v2["data"]) == len(v1["data"])
        for a1, a2 in zip(v1["data"], v2["data"]):
            (p1,), (p2,) = a1["paragraphs"], a2["paragraphs"]
            assert p2["context"] == p1["context"] and p2["qas"][:-1] == p1["qas"]
            extra = p2["qas"][-1]
            assert extra["is_impossible"] and extra["answers"] == [] and extra["id"].endswith("-u")
            subject = a2["title"]  # the main person (the question names them, or their unstated city / pet)
            fact = next(f for f, q, _ in QUESTIONS if re.fullmatch(_pattern(q, subject), extra["question"]))
            for sentence in re.split(r"(?<=\.) ", p2["context"]):
                assert not any(re.fullmatch(_pattern(t, subject), sentence) for t in SENTENCES[fact]), sentence
    assert sum(1 for art in world.validation_v2["data"] for qa in art["paragraphs"][0]["qas"]
               if qa.get("is_impossible")) == SMALL.validation_contexts


def _pattern(template: str, subject: str) -> str:
    """A regex of the texts `template` renders about `subject` (any value in the other fields)."""
    first = subject.split()[0]
    out = []
    for literal, field, _, _ in string.Formatter().parse(template):
        out.append(re.escape(literal))
        if field is not None:
            out.append({"P": re.escape(subject), "F": f"(?:{re.escape(subject)}|{re.escape(first)})"}.get(field, ".+?"))
    return "".join(out)


def _words(texts):
    return {w for t in texts for w in re.findall(r"[A-Za-z]+", t)}


def test_train_and_validation_share_no_entity():
    world = make_world()
    train, corpus = world.pools["train"], world.pools["corpus"]
    val = world.pools["validation"]
    for field in ("first", "last", "cities", "companies", "pets"):
        v = set(getattr(val, field))
        assert not v & set(getattr(train, field)) and not v & set(getattr(corpus, field))
    # and in the text itself: no validation name appears in training questions or the corpus
    records = load_split(WORLD_DATA_DIR, "train").records
    seen = _words([r.context + " " + r.question for r in records]) | _words(world.corpus)
    val_names = set(val.first) | set(val.last) | set(val.cities) | set(val.pets) | {c.split()[0] for c in val.companies}
    assert val_names and not val_names & seen


def test_tokenizer_loads_through_autotokenizer_and_round_trips():
    tok = AutoTokenizer.from_pretrained(str(WORLD_MODEL_DIR))
    assert tok.is_fast and tok.eos_token == tok.bos_token == tok.pad_token == EOS
    assert tok.convert_tokens_to_ids(EOS) == tok.eos_token_id
    assert 2000 <= len(tok) <= 4000
    r = load_split(WORLD_DATA_DIR, "validation").records[0]
    text = format_prompt(r.context, r.question) + r.answers[0] + EOS
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[-1] == tok.eos_token_id and tok.decode(ids) == text
    # a word has the same tokens after a space and at a line start (the answer is a token copy)
    word = r.answers[0]
    assert tok(" " + word)["input_ids"][1:] == tok("\n" + word)["input_ids"][1:] == tok(word)["input_ids"]


def test_pretrain_world_smoke(tmp_path):
    """Two steps of the pretraining entry point on a tiny model; the checkpoint loads back."""
    models = pytest.importorskip("lora_jax.models")
    import jax.numpy as jnp

    from train.pretrain_world import main

    main(["--hidden-size", "32", "--num-layers", "1", "--num-heads", "2", "--seq-len", "32", "--batch-size", "2",
          "--steps", "2", "--warmup-steps", "1", "--max-documents", "200", "--out", str(tmp_path)])
    model, params = models.from_pretrained(tmp_path)
    tok = models.load_tokenizer(tmp_path)
    assert model.config.vocab_size == len(tok) and model.config.eos_token_id == tok.eos_token_id
    ids = jnp.asarray([tok("Ada lives in Rome.")["input_ids"]])
    logits = model.apply(params, ids)
    assert logits.shape == (1, ids.shape[1], len(tok)) and bool(jnp.isfinite(logits).all())
