"""Shared pytest fixtures.

Tiny Hugging Face checkpoints (session-scoped, built once per test run, read-only: copy the
directory before modifying anything in it):

* `tiny_gpt2_dir`: `GPT2LMHeadModel` (2 layers, hidden 32, 4 heads, vocab 320, 64 positions).
* `tiny_bloom_dir`: `BloomForCausalLM` (2 layers, hidden 48, 6 heads, vocab 320).
* `wide_dirs`: {"gpt2", "bloom"}, the same with hidden 64 (BLOOM 4 heads), for bitsandbytes.

Each holds `config.json`, `model.safetensors` (transformers `save_pretrained`) and a tiny
byte-level BPE tokenizer (loadable with `AutoTokenizer` / `lora_jax.models.load_tokenizer`;
GPT-2: `<|endoftext|>` = eos = bos = pad; BLOOM: `<unk>`=0, `<s>`=1, `</s>`=2, `<pad>`=3).
Weights are random with std 0.2 (larger than HF's 0.02 init) so that layout mistakes show up
in logits. Load the PyTorch reference with
`AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager")`.

`nudge_torch(model, seed)` makes a fresh PEFT adapter nonzero (noise on its trainable parameters);
`peft_grads(model, ids)` reads its gradients in our layout, `peft_train(model, opt, ids)` trains it.
`cudnn_standin(check)` stands in for cuDNN attention on CPU (see its docstring).
"""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_VOCAB = 320
_CORPUS = [
    "CONTEXT\nThe quick brown fox jumps over the lazy dog.\n\nQUESTION\nWhat jumps?\n\nANSWER\nfox",
    "LoRA adapts a frozen model with low-rank updates to its weight matrices.",
    "JAX transforms pure functions: grad, jit, vmap and scan compose freely.",
    "Hello world! Tiny tokenizers are enough for tests; numbers 0123456789 too.",
] * 4


def _tiny_tokenizer(specials: list[str], **special_map: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    assert tok.get_vocab_size() <= TINY_VOCAB
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special_map)


def _randomize(model, std: float = 0.2) -> None:
    import torch

    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "weight" in name:  # LayerNorm gains around 1
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(std * torch.randn_like(p))


def _save(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def _gpt2_checkpoint(path: Path, hidden: int) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = _tiny_tokenizer(
        ["<|endoftext|>"], eos_token="<|endoftext|>", bos_token="<|endoftext|>",
        pad_token="<|endoftext|>", unk_token="<|endoftext|>",
    )
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    cfg = GPT2Config(
        vocab_size=TINY_VOCAB, n_positions=64, n_embd=hidden, n_layer=2, n_head=4,
        bos_token_id=eos, eos_token_id=eos,
    )
    model = GPT2LMHeadModel(cfg).eval()
    _randomize(model)
    return _save(model, tok, path)


def _bloom_checkpoint(path: Path, hidden: int, heads: int) -> Path:
    from transformers import BloomConfig, BloomForCausalLM

    tok = _tiny_tokenizer(
        ["<unk>", "<s>", "</s>", "<pad>"], unk_token="<unk>", bos_token="<s>",
        eos_token="</s>", pad_token="<pad>", padding_side="left",
    )
    cfg = BloomConfig(
        vocab_size=TINY_VOCAB, hidden_size=hidden, n_layer=2, n_head=heads,
        bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )
    model = BloomForCausalLM(cfg).eval()
    _randomize(model)
    return _save(model, tok, path)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """Directory of a tiny random GPT-2 checkpoint (safetensors) + tokenizer."""
    return _gpt2_checkpoint(tmp_path_factory.mktemp("tiny_gpt2"), hidden=32)


@pytest.fixture(scope="session")
def tiny_bloom_dir(tmp_path_factory) -> Path:
    """Directory of a tiny random BLOOM checkpoint (safetensors) + tokenizer."""
    return _bloom_checkpoint(tmp_path_factory.mktemp("tiny_bloom"), hidden=48, heads=6)


@pytest.fixture(scope="session")
def wide_dirs(tmp_path_factory) -> dict[str, Path]:
    """{"gpt2", "bloom"}: the tiny checkpoints with hidden 64, so every weight row is a multiple
    of 64 wide (the shapes on which bitsandbytes' CPU 4-bit kernels are right)."""
    return {"gpt2": _gpt2_checkpoint(tmp_path_factory.mktemp("wide_gpt2"), hidden=64),
            "bloom": _bloom_checkpoint(tmp_path_factory.mktemp("wide_bloom"), hidden=64, heads=4)}


@pytest.fixture
def nudge_torch():
    """`nudge(model, seed)`: add 0.1 * N(0, 1) to every trainable torch parameter (so a fresh
    PEFT adapter's lora_B is nonzero); returns the model in eval mode."""
    def nudge(model, seed: int):
        import torch

        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
        return model.eval()
    return nudge


@pytest.fixture
def peft_grads():
    """`grads(model, ids)`: a PEFT model's training-mode gradients of mean(logits^2) (every torch
    dropout off, so the function is ours), as {our kernel path: {"lora_A" / "lora_B" / ...: the
    gradient transposed to our layout}}."""
    def grads(model, ids):
        import torch

        model.train()
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        model.zero_grad()
        (model(torch.tensor(ids, dtype=torch.long)).logits ** 2).mean().backward()
        out: dict = {}
        for n, p in model.named_parameters():
            if p.requires_grad:  # <module>.lora_A.default.weight, <module>.lora_diag.default
                module, k = n.removeprefix("base_model.model.").rsplit(".lora_", 1)
                out.setdefault(module.replace(".", "/") + "/kernel", {})["lora_" + k.split(".")[0]] = p.grad.numpy().T
        return out
    return grads


@pytest.fixture
def peft_train():
    """`train(model, opt, ids, steps=3)`: `steps` steps of the torch optimizer `opt` on a PEFT
    model's next-token loss over `ids`; returns the adapter's state dict (PEFT's keys) as numpy."""
    def train(model, opt, ids, steps: int = 3):
        import torch
        from peft.utils import get_peft_model_state_dict

        x = torch.tensor(ids, dtype=torch.long)
        for _ in range(steps):
            opt.zero_grad()
            model(x, labels=x).loss.backward()
            opt.step()
        return {k: v.detach().numpy() for k, v in get_peft_model_state_dict(model).items()}
    return train


@pytest.fixture
def jax_train():
    """`train(loss, tx, config, params, adapters, batch, steps) -> (trainable, frozen, first, last)`:
    `steps` jitted `lj.make_train_step` steps of `loss(params, adapters, batch)` on one batch, from
    `lj.split(config, params, adapters)`; first and last are the losses of the first and last step."""
    def train(loss, tx, config, params, adapters, batch, steps: int):
        import jax

        import lora_jax as lj

        trainable, frozen = lj.split(config, params, adapters)
        step = lj.make_train_step(loss, tx)
        state, run, first = step.init(trainable), jax.jit(step.step), None
        for _ in range(steps):
            trainable, state, value = run(trainable, frozen, state, batch)
            first = value if first is None else first
        return trainable, frozen, float(first), float(value)
    return train


@pytest.fixture
def cudnn_standin(monkeypatch):
    """install(check): `jax.nn.dot_product_attention(..., implementation="cudnn")` becomes XLA
    attention wrapped in a `jax.custom_vjp`, as jax's cuDNN attention is one, so the GPU branch runs
    on CPU; other implementations pass through. `check(implementation, q, bias, mask)` sees every
    call first (assert there, record what reached cuDNN)."""
    import jax

    real = jax.nn.dot_product_attention

    def install(check):
        def standin(q, k, v, bias=None, mask=None, *, implementation=None, **kw):
            check(implementation, q, bias, mask)
            if implementation != "cudnn":
                return real(q, k, v, bias=bias, mask=mask, implementation=implementation, **kw)
            xla = lambda q, k, v, b, m: real(q, k, v, bias=b, mask=m, implementation="xla", **kw)  # noqa: E731
            fused = jax.custom_vjp(xla)
            fused.defvjp(lambda *a: (xla(*a), a),
                         lambda a, g: (*jax.vjp(lambda *d: xla(*d, a[-1]), *a[:-1])[1](g), None))  # no mask grad
            return fused(q, k, v, bias, mask)
        monkeypatch.setattr(jax.nn, "dot_product_attention", standin)
    return install
