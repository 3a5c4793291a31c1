"""Reference encoder: a HF transformers model's per-layer K/V for a chunk, alone or in context."""

from kvreuse.reference.encoder import ChunkKV, ReferenceEncoder

__all__ = ["ChunkKV", "ReferenceEncoder"]
