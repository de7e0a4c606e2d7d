"""Training jobs built on lora_jax: `python -m train.squad` and what it needs (data, metrics, the offline world)."""
