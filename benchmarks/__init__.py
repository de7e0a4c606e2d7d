"""Benchmarks (speed and memory vs full fine-tuning and vs Hugging Face PEFT); see `bench.py`."""
