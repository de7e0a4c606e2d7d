"""Per-token task heads on the GPT-2 / BLOOM decoder, as transformers' `*ForQuestionAnswering` and
`*ForTokenClassification` (PEFT's QUESTION_ANS and TOKEN_CLS tasks; `SequenceClassifier` in
`common` is SEQ_CLS).

    qa, params = question_answering_from_pretrained("gpt2")          # `qa_outputs` [D, 2] + bias
    start, end = qa.apply(params, input_ids, attention_mask)         # [B, T] each
    spans = best_spans(start, end, context_mask, max_answer_len=30)  # [B, 2] token indices, inclusive
    tagger, params = token_classifier_from_pretrained("gpt2", num_labels=9)
    tags = tagger.apply(params, input_ids, attention_mask)           # [B, T, 9]

Params: `{"transformer": ..., HEAD: {"kernel": [D, N], "bias": [N]}}`, the head a torch Linear with a
bias in both architectures (HF `qa_outputs.weight` (2, D), `classifier.weight` (N, D)). PEFT trains
the head in full (`modules_to_save`): `LoraConfig(trainable="qa_outputs")` / `trainable="classifier"`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.models.common import BaseConfig, CausalLM, Params, WithHead, head_kernel

QA_OUTPUTS = "qa_outputs"  # HF's extractive-QA head: Linear(hidden, 2), start and end logits
CLASSIFIER = "classifier"  # HF's token-classification head: dropout, then Linear(hidden, num_labels)


def _dense_head(config: BaseConfig, name: str, features: int, key: jax.Array, dtype: Any) -> Params:
    """A new `{name: {kernel [D, features], bias}}` as transformers initialises a Linear
    (`head_kernel`, bias 0)."""
    kernel = head_kernel(config, features, key, dtype)
    return {name: {"kernel": kernel, "bias": jnp.zeros((features,), kernel.dtype)}}


def _project(params: Params, name: str, hidden: jax.Array) -> jax.Array:
    """hidden [B, T, D] through the head `name` -> [B, T, N] in hidden's dtype."""
    head = params[name]
    out = jnp.einsum("btd,dn->btn", hidden, head["kernel"].astype(hidden.dtype))
    return out + head["bias"].astype(hidden.dtype)


@dataclasses.dataclass(frozen=True)
class QuestionAnswering(WithHead):
    """The decoder with Hugging Face's extractive-QA head (`GPT2ForQuestionAnswering`,
    `BloomForQuestionAnswering`): start and end logits per token from `qa_outputs` [D, 2] + bias."""

    config: BaseConfig

    def apply(self, params: Params, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
              deterministic: bool = True, rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """(start_logits, end_logits), each [B, T] in the compute dtype; the decoder runs as in
        `CausalLM.apply` (right padding, as transformers' QA models are fed)."""
        hidden = CausalLM(self.config).apply(params, input_ids, attention_mask, return_hidden=True,
                                             deterministic=deterministic, rng=rng)  # [B, T, D]
        logits = _project(params, QA_OUTPUTS, hidden)  # [B, T, 2]
        return logits[..., 0], logits[..., 1]

    def init_head(self, key: jax.Array, dtype: Any = None) -> Params:
        """A new `{"qa_outputs": {"kernel", "bias"}}`, as transformers initialises it."""
        return _dense_head(self.config, QA_OUTPUTS, 2, key, dtype)


@dataclasses.dataclass(frozen=True)
class TokenClassifier(WithHead):
    """The decoder with Hugging Face's token-classification head (`GPT2ForTokenClassification`,
    `BloomForTokenClassification`): dropout (`dropout_rate`, in training only), then `classifier`
    [D, num_labels] + bias on every token."""

    config: BaseConfig
    num_labels: int

    def __post_init__(self) -> None:
        if not isinstance(self.num_labels, int) or isinstance(self.num_labels, bool) or self.num_labels < 1:
            raise ValueError(f"num_labels must be a positive integer, got {self.num_labels!r}")

    @property
    def dropout_rate(self) -> float:
        """transformers' choice: the config's classifier_dropout, else its hidden_dropout (BLOOM's),
        else 0.1."""
        hf = self.config.hf_config
        if hf.get("classifier_dropout") is not None:
            return float(hf["classifier_dropout"])
        # BLOOM's field first: `config.replace(hidden_dropout=...)` leaves hf_config as loaded, and
        # the export (which transformers builds the head from) writes the field
        hidden = getattr(self.config, "hidden_dropout", None)
        hidden = hf.get("hidden_dropout") if hidden is None else hidden
        return 0.1 if hidden is None else float(hidden)

    def apply(self, params: Params, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
              deterministic: bool = True, rng: jax.Array | None = None) -> jax.Array:
        """Label logits [B, T, num_labels] in the compute dtype."""
        body_rng, head_rng = (None, None) if rng is None else jax.random.split(rng)
        hidden = CausalLM(self.config).apply(params, input_ids, attention_mask, return_hidden=True,
                                             deterministic=deterministic, rng=body_rng)  # [B, T, D]
        if not deterministic and self.dropout_rate > 0:
            keep = jax.random.bernoulli(head_rng, 1.0 - self.dropout_rate, hidden.shape)
            hidden = jnp.where(keep, hidden / (1.0 - self.dropout_rate), 0).astype(hidden.dtype)
        return _project(params, CLASSIFIER, hidden)

    def init_head(self, key: jax.Array, dtype: Any = None) -> Params:
        """A new `{"classifier": {"kernel", "bias"}}`, as transformers initialises it."""
        return _dense_head(self.config, CLASSIFIER, self.num_labels, key, dtype)


def best_spans(start_logits: jax.Array, end_logits: jax.Array, allowed: jax.Array | None = None, *,
               max_answer_len: int = 30) -> tuple[jax.Array, jax.Array]:
    """The highest-scoring answer span per row, as transformers' QA pipeline picks it: start <= end <
    start + max_answer_len, both on `allowed` tokens (e.g. the context's; default all), score
    start_logit + end_logit. Returns (spans [B, 2] int32, first and last token inclusive; scores [B]).
    Jittable; a row with no allowed token gets score -inf."""
    if not isinstance(max_answer_len, int) or isinstance(max_answer_len, bool) or max_answer_len < 1:
        raise ValueError(f"max_answer_len must be a positive integer, got {max_answer_len!r}")
    shapes = {"start_logits": start_logits.shape, "end_logits": end_logits.shape}
    if allowed is not None:
        shapes["allowed"] = allowed.shape
    if len(set(shapes.values())) > 1 or len(start_logits.shape) != 2:
        raise ValueError(f"best_spans wants [B, T] arrays of one shape, got {shapes}")
    s, e = start_logits.astype(jnp.float32), end_logits.astype(jnp.float32)  # [B, T]
    T = s.shape[1]
    i, j = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
    ok = (j >= i) & (j < i + max_answer_len)  # [T, T]: start i, end j
    if allowed is not None:
        a = allowed.astype(bool)
        ok = ok & a[:, :, None] & a[:, None, :]  # [B, T, T]
    score = jnp.where(ok, s[:, :, None] + e[:, None, :], -jnp.inf).reshape(s.shape[0], T * T)  # [B, T*T]
    best = jnp.argmax(score, axis=1)  # [B]
    return jnp.stack([best // T, best % T], axis=1).astype(jnp.int32), jnp.max(score, axis=1)
