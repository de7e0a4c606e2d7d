"""Pretrain the tiny GPT-2 of the embedded offline world on its encyclopedia corpus.

    python -m train.make_assets        # first: the QA splits and the tokenizer
    python -m train.pretrain_world     # then: config.json + model.safetensors (~30 min, 2 CPU cores)

A plain causal-LM loop (optax AdamW, warmup + cosine) over random windows of the concatenated,
EOS-separated corpus of `train.world.make_world()`, with the Flax GPT-2 of `lora_jax.models`
(d=128, 4 layers, 4 heads, 256 positions, 1.2M parameters). The result lands next to the
tokenizer in `train/assets/world_model/`, a Hugging Face GPT-2 checkpoint that
`lora_jax.models.from_pretrained` (and transformers) load. The model never sees the QA format;
it learns the world's language and, from passages that restate their own facts, to copy spans
from earlier context — what LoRA later turns into extractive QA.

Why 6000 steps: copying is an induction circuit that forms abruptly. With 8 x 256-token
batches, names seen earlier in a passage are predicted ~2% of the time at step 800, ~35% at
2000 and ~75% at 3000; before that phase change LoRA cannot learn extraction at all (EM 0 on a
600-step model). Mixing in synthetic copy rows or a short-window curriculum did not bring it
forward on this corpus.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from train.world import WORLD_MODEL_DIR, WorldConfig, make_world


@dataclass(frozen=True)
class PretrainConfig:
    """Model size and optimisation of the world model."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    seq_len: int = 256  # also the model's n_positions
    batch_size: int = 8
    steps: int = 6000
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    seed: int = 0


def corpus_stream(tokenizer, texts: list[str]) -> np.ndarray:
    """All documents as one int32 token stream, each followed by EOS (as GPT-2 was trained)."""
    eos = int(tokenizer.eos_token_id)
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]  # no >max_length warning
    return np.fromiter((t for doc in ids for t in (*doc, eos)), dtype=np.int32)


def sample_windows(stream: np.ndarray, rng: np.random.Generator, batch_size: int, length: int) -> np.ndarray:
    """[B, length + 1] random windows of the stream (inputs are [:, :-1], targets [:, 1:])."""
    starts = rng.integers(0, len(stream) - length - 1, size=batch_size)
    return np.stack([stream[s : s + length + 1] for s in starts])


def make_model(cfg: PretrainConfig, vocab_size: int, eos_id: int):
    """A fresh `CausalLM` GPT-2 whose config round-trips through transformers' `GPT2Config`."""
    from transformers import GPT2Config as HFGPT2Config

    from lora_jax.models import CausalLM, GPT2Config

    hf = HFGPT2Config(
        vocab_size=vocab_size, n_positions=cfg.seq_len, n_embd=cfg.hidden_size, n_layer=cfg.num_layers,
        n_head=cfg.num_heads, n_inner=4 * cfg.hidden_size, bos_token_id=eos_id, eos_token_id=eos_id,
        pad_token_id=eos_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        architectures=["GPT2LMHeadModel"],
    ).to_dict()
    return CausalLM(GPT2Config.from_hf(hf))


def pretrain(cfg: PretrainConfig, tokenizer, texts: list[str], log_every: int = 100,
             save_every: int = 0, save: Callable[[Any, Any], None] | None = None):
    """Train from scratch; returns (model, params, final mean loss over the last `log_every` steps).

    `save(model, params)` is called every `save_every` steps (and not at the end: the caller saves).
    """
    model = make_model(cfg, len(tokenizer), int(tokenizer.eos_token_id))
    stream = corpus_stream(tokenizer, texts)
    print(f"corpus: {len(texts)} documents, {len(stream) / 1e6:.2f}M tokens; "
          f"{cfg.steps * cfg.batch_size * cfg.seq_len / len(stream):.2f} epochs")
    params = model.init_params(jax.random.key(cfg.seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps, cfg.steps,
                                                  end_value=cfg.learning_rate / 10)
    # no weight decay on biases, LayerNorm and embeddings' 1-d leaves
    decay_mask = jax.tree.map(lambda p: p.ndim >= 2, params)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, b2=0.99, weight_decay=cfg.weight_decay, mask=decay_mask))
    opt_state = tx.init(params)

    def loss_fn(params, window):
        logits = model.apply(params, window[:, :-1])  # [B, T, V]
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), window[:, 1:]).mean()

    @jax.jit
    def step(params, opt_state, window):
        loss, grads = jax.value_and_grad(loss_fn)(params, window)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(cfg.seed)
    losses, t0 = [], time.perf_counter()
    for i in range(cfg.steps):
        params, opt_state, loss = step(params, opt_state, sample_windows(stream, rng, cfg.batch_size, cfg.seq_len))
        losses.append(loss)
        if (i + 1) % log_every == 0 or i + 1 == cfg.steps:
            recent = float(np.mean(jax.device_get(losses[-log_every:])))
            print(f"step {i + 1:5d}  loss {recent:.3f}  {time.perf_counter() - t0:6.0f}s", flush=True)
        if save is not None and save_every and (i + 1) % save_every == 0 and i + 1 < cfg.steps:
            save(model, params)
    return model, params, float(np.mean(jax.device_get(losses[-log_every:])))


def main(argv: list[str] | None = None) -> None:
    defaults = PretrainConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--out", type=Path, default=WORLD_MODEL_DIR, help="checkpoint directory (holds the tokenizer)")
    parser.add_argument("--max-documents", type=int, default=None, help="use only the first N corpus documents")
    parser.add_argument("--save-every", type=int, default=0, help="also save the checkpoint every N steps")
    args = parser.parse_args(argv)
    cfg = PretrainConfig(**{k: getattr(args, k) for k in asdict(defaults)})

    from transformers import AutoTokenizer

    from lora_jax.models import save_hf_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(str(WORLD_MODEL_DIR))
    texts = list(make_world(WorldConfig()).corpus)[: args.max_documents]
    def save(model, params):
        save_hf_checkpoint(args.out, model.config, params)
        if args.out.resolve() != WORLD_MODEL_DIR.resolve():  # keep the checkpoint self-contained
            for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                (args.out / f).write_bytes((WORLD_MODEL_DIR / f).read_bytes())

    model, params, loss = pretrain(cfg, tokenizer, texts, save_every=args.save_every, save=save)
    save(model, params)
    print(f"saved {args.out} (final loss {loss:.3f}, {math.fsum(x.size for x in jax.tree.leaves(params)) / 1e6:.2f}M params)")


if __name__ == "__main__":
    main()
