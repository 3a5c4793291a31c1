"""Fixtures of the store tests: small entries, a fingerprint, a real redis-server."""

from __future__ import annotations

import pytest
import torch

from kvreuse.store import ChunkEntry, ChunkKey, ModelFingerprint
from tests.support.redis_server import redis_server_or_skip

torch.set_num_threads(1)

FP = ModelFingerprint("TestArch", "weights-sha256-0", "bfloat16")
OTHER_FP = ModelFingerprint("TestArch", "weights-sha256-1", "bfloat16")


def make_entry(seed: int, *, layers: int = 3, tokens: int = 8, heads: int = 2, dim: int = 16,
               dtype: torch.dtype = torch.bfloat16, model: ModelFingerprint = FP, mrope: bool = False,
               context: bytes = b"isolated") -> ChunkEntry:
    """A deterministic entry; token ids and KV derive from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50_000, (tokens,), generator=g)
    pos = torch.arange(tokens) + seed % 97
    if mrope:
        pos = torch.stack([pos, pos + 1, pos + 2])
    k = torch.randn(layers, tokens, heads, dim, generator=g).to(dtype)
    v = torch.randn(layers, tokens, heads, dim, generator=g).to(dtype)
    return ChunkEntry(ChunkKey.of(model, ids), ids, pos, k, v, context=context)


@pytest.fixture
def redis_server():
    srv = redis_server_or_skip()
    try:
        yield srv
    finally:
        srv.close()
