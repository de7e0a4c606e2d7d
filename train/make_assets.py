"""Regenerate the embedded offline world: the QA splits and the tokenizer.

    python -m train.make_assets            # writes train/assets/world/ and the tokenizer files
    python -m train.make_assets --check    # exits 1 if the committed assets differ

Writes `train/assets/world/{train,validation}.json` (SQuAD v1.1) and, under
`train/assets/world_model/`, a byte-level BPE `tokenizer.json` with the `tokenizer_config.json`
and `special_tokens_map.json` that let `transformers.AutoTokenizer.from_pretrained(dir)` load it
as a GPT-2-style fast tokenizer. The model weights there come from `train/pretrain_world.py`.
The pretraining corpus is not stored: `train.world.make_world().corpus` regenerates it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from train.data import format_prompt
from train.world import EOS, WORLD_DATA_DIR, WORLD_MODEL_DIR, WORLD_V2_DIR, World, WorldConfig, dumps_squad, make_world

MODEL_MAX_LENGTH = 256


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE with `<|endoftext|>` as its only special token; spaces are own tokens.

    Unlike GPT-2, a space is never glued to the next word: a word then has the same tokens after
    a space and at the start of a line, so the answer after `ANSWER\n` is a verbatim token copy
    of its span in the context. A tiny model learns that copy quickly; with GPT-2's " word"
    tokens it would also have to learn to respell every unseen name.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(" ", behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def tokenizer_training_text(world: World) -> list[str]:
    """The corpus plus the training prompts (never validation text: its names stay unseen)."""
    prompts = [
        format_prompt(para["context"], qa["question"]) + qa["answers"][0]["text"]
        for art in world.train["data"] for para in art["paragraphs"] for qa in para["qas"]
    ]
    return list(world.corpus) + prompts


def tokenizer_files(tok: Tokenizer) -> dict[str, str]:
    """File name -> text of everything `AutoTokenizer.from_pretrained(dir)` needs."""
    specials = {"bos_token": EOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "model_max_length": MODEL_MAX_LENGTH,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }
    dump = lambda d: json.dumps(d, indent=2, sort_keys=True) + "\n"
    return {
        "tokenizer.json": tok.to_str(pretty=True) + "\n",
        "tokenizer_config.json": dump(config),
        "special_tokens_map.json": dump(specials),
    }


def asset_files(config: WorldConfig = WorldConfig()) -> dict[Path, str]:
    """Every generated asset path -> its exact text."""
    world = make_world(config)
    tok = train_tokenizer(tokenizer_training_text(world), config.vocab_size)
    files = {
        WORLD_DATA_DIR / "train.json": dumps_squad(world.train),
        WORLD_DATA_DIR / "validation.json": dumps_squad(world.validation),
        WORLD_V2_DIR / "train.json": dumps_squad(world.train_v2),
        WORLD_V2_DIR / "validation.json": dumps_squad(world.validation_v2),
    }
    files.update({WORLD_MODEL_DIR / name: text for name, text in tokenizer_files(tok).items()})
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the committed assets, write nothing")
    args = parser.parse_args(argv)
    stale = []
    for path, text in asset_files().items():
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path} ({len(text.encode()) / 1e3:.0f} kB)")
    for path in stale:
        print(f"stale: {path}", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
