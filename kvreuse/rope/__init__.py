"""Rotary embeddings: the spec of a model's RoPE and the reference rotation math."""

from kvreuse.rope.spec import RopeSpec

__all__ = ["RopeSpec"]
