"""Offline tiny checkpoints (random weights, hand-built tokenizer) for tests, demos and benches."""

from kvreuse.models.tiny import TinySpec, build_tiny_model, default_model_dir, tiny_words

__all__ = ["TinySpec", "build_tiny_model", "default_model_dir", "tiny_words"]
