"""GPU check of the models' cuDNN attention branch under LoRA, with padding: one factored LoRA
loss and gradient per model through `attention_impl="cudnn"` against the same through XLA, on
tiny bf16 GPT-2 and BLOOM configs whose rows are right-padded (the padding reaches cuDNN beside
the causal flag; BLOOM's ALiBi folded into 8 more head dims, `models.common.fold_key_bias`).

    python -m benchmarks.gpu_check            # on a GPU: cudnn against xla
    python -m benchmarks.gpu_check --impl xla # anywhere: the script itself (xla against xla)

Prints one line per model: whether cuDNN's fused attention is in the compiled step, and the
relative error of the loss and of the adapter gradients; exits 1 when any check fails.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax as lj
from lora_jax.models import BloomConfig, CausalLM, GPT2Config

LENGTHS = (64, 50, 33, 17)  # real tokens per row, right-padded to T = 64


def _model(arch: str, impl: str) -> tuple[CausalLM, list[str]]:
    kw = dict(vocab_size=256, hidden_size=128, num_layers=2, num_heads=2,  # head dim 64
              param_dtype=jnp.bfloat16, attention_impl=impl)
    if arch == "gpt2":
        return CausalLM(GPT2Config(intermediate_size=512, max_position_embeddings=64, **kw)), ["c_attn"]
    return CausalLM(BloomConfig(intermediate_size=512, **kw)), ["query_key_value"]


def _step(arch: str, impl: str):
    """The jitted factored-LoRA loss and adapter gradient, and its compiled HLO text."""
    model, targets = _model(arch, impl)
    params = model.init_params(jax.random.key(0))
    config = lj.LoraConfig(rank=8, alpha=16, targets=targets)
    leaves, treedef = jax.tree.flatten(lj.init(config, params, jax.random.key(1)))
    adapters = jax.tree.unflatten(  # B != 0, so every factor gets a gradient
        treedef, [x + 0.05 * jax.random.normal(jax.random.key(i), x.shape, x.dtype) for i, x in enumerate(leaves)]
    )
    T = max(LENGTHS)
    ids = jax.random.randint(jax.random.key(2), (len(LENGTHS), T), 0, 256)
    mask = (jnp.arange(T)[None, :] < jnp.array(LENGTHS)[:, None]).astype(jnp.int32)  # [B, T]
    forward = lj.apply(model.apply, config)

    def loss(a):
        logits = forward(params, a, ids, attention_mask=mask).astype(jnp.float32)  # [B, T, V]
        logp = jax.nn.log_softmax(logits[:, :-1])
        nll = -jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]  # [B, T-1]
        w = mask[:, 1:]
        return (nll * w).sum() / w.sum()

    step = jax.jit(jax.value_and_grad(loss))
    hlo = step.lower(adapters).compile().as_text()
    value, grads = step(adapters)
    return float(value), jax.tree.leaves(grads), hlo


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impl", default="cudnn", choices=["cudnn", "xla"], help="implementation checked against xla")
    p.add_argument("--models", nargs="+", default=["gpt2", "bloom"], choices=["gpt2", "bloom"])
    args = p.parse_args(argv)
    print(f"devices {jax.devices()}, jax {jax.__version__}")
    failed = False
    for arch in args.models:
        try:
            loss, grads, hlo = _step(arch, args.impl)
        except Exception as e:  # report every model, then fail
            print(f"{arch}: {args.impl} step FAILED: {type(e).__name__}: {str(e)[:2000]}")
            failed = True
            continue
        ref_loss, ref_grads, _ = _step(arch, "xla")
        fused = "__cudnn$fmha" in hlo
        err = max(_rel(g, r) for g, r in zip(grads, ref_grads))
        ok = np.isfinite(loss) and abs(loss - ref_loss) <= 2e-2 * abs(ref_loss) and err <= 5e-2
        ok = ok and (fused or args.impl == "xla")
        failed |= not ok
        print(f"{arch}: {'ok' if ok else 'FAILED'}; cuDNN fused attention in the compiled step: {fused}; "
              f"loss {loss:.5f} vs xla {ref_loss:.5f}; max relative gradient error {err:.2e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
