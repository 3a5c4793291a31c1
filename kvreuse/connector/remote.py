"""Chunks stored by *other* vLLM instances, seen through the shared Redis tier (scheduler side).

The scheduler's `Directory` knows the chunks its own worker saved.  With a Redis tier configured,
a chunk missing there is looked up in Redis: a read of the entry's verified header (model
fingerprint, token count, the context it was computed in and the contexts it holds KV or a patch
for) — never its payload, and nothing is written, so claims stay free of side effects.  The
preceding keys of a remote entry's contexts are not stored, only their signatures, so a remote
chunk is claimed `exact` when the request's context signature is one of them and `blind`
otherwise (survival/reorder need the key lists, which only the local directory has).
"""

from __future__ import annotations

from kvreuse.store.keys import ChunkKey
from kvreuse.store.tiers.redis import RedisTier


class RemoteLookup:
    """`lookup(digest) -> (num_tokens, context signatures) | None` against a shared Redis tier."""

    def __init__(self, url: str, budget_bytes: int, model_digest: bytes, namespace: str = "kvreuse:") -> None:
        self.tier = RedisTier(url, budget_bytes, model_digest, namespace=namespace)

    def lookup(self, digest: bytes) -> tuple[int, tuple[bytes, ...]] | None:
        reader = self.tier.open(ChunkKey(digest))           # None: absent, unreachable, or a bad header
        if reader is None:
            return None
        h = reader.header
        contexts = (h.context,) + tuple(h.contexts) + tuple(h.patch_contexts)
        return int(h.shape[1]), tuple(dict.fromkeys(contexts))
