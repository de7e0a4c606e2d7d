"""lora_jax: LoRA as a pure transform over JAX parameter pytrees.

    config = LoraConfig(rank=16, alpha=32, targets=["c_attn"])
    adapters = init(config, params, jax.random.key(0))
    g = apply(model.apply, config)           # g(params, adapters, *args)
    logits = jax.jit(g)(params, adapters, input_ids)
"""

from . import adalora, bdlora, corda, eva, inputs, kasa, lazy, lora_ga, optim, quant, sharding, tree, velora
from .config import FLAX_ATTENTION_AXES, AdaLoraSchedule, BdLoraConfig, LoraConfig
from .lazy import FallbackError, LoraArray
from .lora import (ADALORA_E, KASA_DIAG, LORA_BIAS, MAGNITUDE, TOKENS, Summary, alora_mask, apply, check_adapters, init,
                   init_tokens, merge, scales, summary, target_paths, token_rows, trainable_mask, unmerge)
from .optim import TrainStep, join, labels, lorafa, loraplus, make_train_step, masked_optimizer, mica, split
from .corda import init_corda
from .eva import EvaConfig, init_eva
from .intruders import reduce_intruders
from .kasa import init_kasa, kasa_base, kasa_loss
from .loftq import init_loftq
from .lora_ga import LoraGAConfig, init_lora_ga
from .residual import init_residual, to_plain

__all__ = [
    "LoraConfig", "AdaLoraSchedule", "BdLoraConfig", "ADALORA_E", "FLAX_ATTENTION_AXES", "LoraArray", "FallbackError",
    "Summary", "TrainStep", "MAGNITUDE",
    "LORA_BIAS", "TOKENS", "KASA_DIAG", "alora_mask", "apply", "check_adapters", "init", "init_tokens", "token_rows",
    "merge", "unmerge", "scales", "summary", "target_paths", "trainable_mask", "init_residual", "init_loftq",
    "init_eva", "init_kasa", "kasa_base", "kasa_loss", "EvaConfig", "reduce_intruders", "init_corda", "init_lora_ga",
    "LoraGAConfig", "to_plain", "split", "join", "labels", "masked_optimizer", "make_train_step", "loraplus", "lorafa",
    "mica", "adalora", "bdlora", "corda", "eva", "inputs", "kasa", "lazy", "lora_ga", "optim", "quant", "sharding",
    "tree", "velora",
]
__version__ = "0.1.0"
