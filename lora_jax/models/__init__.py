"""Own Flax GPT-2 and BLOOM with Hugging Face checkpoint loading, export and generation.

    from lora_jax.models import from_pretrained, load_tokenizer, generate
    model, params = from_pretrained("gpt2", dtype=jnp.bfloat16, scan_layers=False)
    logits = model.apply(params, input_ids, attention_mask)          # [B, T, V]
    hidden = model.apply(params, input_ids, return_hidden=True)      # [B, T, D]
    answer = model.apply(params, input_ids, positions=pos)           # [B, K, V] at pos [B, K] only
    packed = model.apply(params, input_ids, segment_ids=seg)         # rows of sequences 1, 2, ... (0: pad)
    new_tokens = generate(model.apply, params, ids, mask, model=model, max_new_tokens=32)
    best = generate(model.apply, params, ids, mask, model=model, max_new_tokens=32, num_beams=4)
    clf, params = classifier_from_pretrained("gpt2", num_labels=3)
    class_logits = clf.apply(params, input_ids, attention_mask)      # [B, 3]
    qa, params = question_answering_from_pretrained("gpt2")          # extractive QA: start, end [B, T]
    spans, _ = best_spans(*qa.apply(params, input_ids, attention_mask), context_mask)  # [B, 2]
    tagger, params = token_classifier_from_pretrained("gpt2", num_labels=9)  # [B, T, 9]
    model, params = resize_token_embeddings(model, params, len(tokenizer))  # after adding tokens
"""

from lora_jax.models.bloom import BloomConfig
from lora_jax.models.common import (
    BaseConfig,
    Cache,
    CausalLM,
    Params,
    SequenceClassifier,
    is_scanned,
    stack_layers,
    unstack_layers,
)
from lora_jax.models.generate import beam_search, generate, sample_logits
from lora_jax.models.heads import QuestionAnswering, TokenClassifier, best_spans
from lora_jax.models.resize import resize_token_embeddings
from lora_jax.models.gpt2 import GPT2Config
from lora_jax.models.hf import (
    CONFIG_CLASSES,
    classifier_from_pretrained,
    convert_hf_state_dict,
    from_pretrained,
    hf_key_to_path,
    load_config,
    load_hf_state_dict,
    load_tokenizer,
    params_to_hf_state_dict,
    path_to_hf_key,
    question_answering_from_pretrained,
    resolve_pretrained_dir,
    save_hf_checkpoint,
    token_classifier_from_pretrained,
)

__all__ = [
    "BaseConfig",
    "BloomConfig",
    "CONFIG_CLASSES",
    "Cache",
    "CausalLM",
    "GPT2Config",
    "Params",
    "QuestionAnswering",
    "SequenceClassifier",
    "TokenClassifier",
    "beam_search",
    "best_spans",
    "classifier_from_pretrained",
    "convert_hf_state_dict",
    "from_pretrained",
    "generate",
    "hf_key_to_path",
    "is_scanned",
    "load_config",
    "load_hf_state_dict",
    "load_tokenizer",
    "params_to_hf_state_dict",
    "path_to_hf_key",
    "question_answering_from_pretrained",
    "resize_token_embeddings",
    "resolve_pretrained_dir",
    "sample_logits",
    "save_hf_checkpoint",
    "stack_layers",
    "token_classifier_from_pretrained",
    "unstack_layers",
]
