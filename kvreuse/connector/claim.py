"""Scheduler-side logic, free of vLLM: chunk keys, the directory of stored chunks, claims, policies.

A claim is the longest run of consecutive stored chunks that starts where vLLM's own prefix hit
ends, ends on a chunk boundary and leaves at least one prompt token to compute.  A chunk that
straddles the prefix hit is loaded from its first uncomputed token.  The first chunk that is not
stored (or that policy refuses) ends the claim; every chunk after it counts as a miss.

Policies (DESIGN.md), decided per chunk from the contexts recorded for it, where a context is the
ordered list of chunk keys that preceded the chunk when its KV was computed:
  exact     the current preceding keys equal a recorded list        → relocate only
  survival  the current list is a recorded one with some dropped    → relocate only
  reorder   the same set of preceding keys in another order         → relocate + that context's KV/patch
  blind     anything else                                           → base KV only, or not claimed
            when the operator requires patched-or-exact reuse
(`recall`, an entry demoted to base + patch, is decided by the worker from what the store serves.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import xxhash

from kvreuse.connector.mrope import as_tuple
from kvreuse.connector.segment import Chunk
from kvreuse.store.keys import ChunkKey

POLICIES = ("exact", "survival", "reorder", "recall", "blind")


def context_signature(preceding: Sequence[bytes]) -> bytes:
    """Signature of a context: xxh3-128 over the digests of the preceding chunk keys, in order."""
    h = xxhash.xxh3_128(b"kvreuse-ctx-v1")
    for d in preceding:
        h.update(d)
    return h.digest()


@dataclass
class DirEntry:
    """What the scheduler knows of a stored chunk: its length and the contexts recorded for it.

    `remote`: stored by another instance (seen in the shared Redis tier); only the signatures of its
    contexts are known, not their preceding keys.
    """

    num_tokens: int
    contexts: dict[bytes, tuple[bytes, ...]] = field(default_factory=dict)  # signature -> preceding digests
    remote: bool = False


class Directory:
    """Keys the worker has stored, with their contexts (fed by worker reports), and optionally a
    read-only view of what other instances stored in the shared Redis tier (`remote.lookup`)."""

    def __init__(self, remote=None) -> None:
        self.entries: dict[bytes, DirEntry] = {}
        self.remote = remote

    def __contains__(self, digest: bytes) -> bool:
        return self.get(digest) is not None

    def get(self, digest: bytes) -> DirEntry | None:
        e = self.entries.get(digest)
        if e is None and self.remote is not None:
            found = self.remote.lookup(digest)
            if found is not None:
                n, sigs = found
                e = DirEntry(n, {s: () for s in sigs}, remote=True)
        return e

    def record(self, digest: bytes, num_tokens: int, preceding: tuple[bytes, ...]) -> None:
        e = self.entries.setdefault(digest, DirEntry(num_tokens))
        e.contexts[context_signature(preceding)] = tuple(preceding)

    def forget(self, digest: bytes) -> None:
        self.entries.pop(digest, None)


def _is_subsequence(short: Sequence[bytes], long: Sequence[bytes]) -> bool:
    it = iter(long)
    return all(any(x == y for y in it) for x in short)


def choose_policy(entry: DirEntry, preceding: tuple[bytes, ...], mode: str) -> tuple[str, bytes] | None:
    """(policy, recorded context signature to read) for a chunk preceded by `preceding`; None = not claimed."""
    sig = context_signature(preceding)
    if sig in entry.contexts:
        return "exact", sig
    if entry.remote:  # only signatures are known: no survival/reorder matching
        return None if mode == "patched_or_exact" else ("blind", next(iter(entry.contexts)))
    best = None
    for s, rec in entry.contexts.items():
        if len(rec) > len(preceding) and _is_subsequence(preceding, rec):
            if best is None or len(rec) < len(entry.contexts[best]):
                best = s
    if best is not None:
        return "survival", best
    cur = sorted(preceding)
    for s, rec in entry.contexts.items():
        if len(rec) == len(preceding) and sorted(rec) == cur:
            return "reorder", s
    if mode == "patched_or_exact":
        return None
    return "blind", next(iter(entry.contexts))


@dataclass(frozen=True)
class LoadItem:
    """Load entry tokens `[src_start, src_end)` of chunk `key` into request positions from `dst_start`."""

    key: bytes
    token_ids: tuple[int, ...]  # the whole chunk's tokens (the store verifies a hit against them)
    src_start: int
    src_end: int
    dst_start: int
    context: bytes
    policy: str
    # M-RoPE models: the request's `[3, n]` positions of the loaded tokens (None: token indices)
    dst_pos: tuple[tuple[int, ...], ...] | None = None

    @property
    def num_tokens(self) -> int:
        return self.src_end - self.src_start


@dataclass
class Claim:
    items: list[LoadItem]
    num_tokens: int  # tokens claimed beyond vLLM's prefix hit
    hits: int
    misses: int


def chunk_keys(token_ids: Sequence[int], chunks: Sequence[Chunk], model_digest: bytes,
               cache_salt: str | None) -> list[bytes]:
    """Content key digest of each chunk (model fingerprint, salt, tokens, media identifiers)."""
    return [ChunkKey.of(model_digest, list(token_ids[c.start:c.end]), cache_salt=cache_salt, mm_ids=c.mm_ids).digest
            for c in chunks]


def plan_claim(token_ids: Sequence[int], chunks: Sequence[Chunk], keys: Sequence[bytes], directory: Directory,
               num_computed: int, mode: str = "any", positions: torch.Tensor | None = None) -> Claim:
    """The claim after `num_computed` prefix-cached tokens (pure: nothing is recorded).

    `positions`: the request's `[3, N]` M-RoPE positions (`kvreuse.connector.mrope`); each item
    then carries its destination positions.  Claims end on chunk boundaries, and a media item
    is one chunk, so a claim never ends inside an image or video span.
    """
    limit = len(token_ids) - 1  # vLLM must compute at least one prompt token
    items: list[LoadItem] = []
    hits = misses = 0
    claiming = True
    for j, c in enumerate(chunks):
        if c.end <= num_computed:
            continue
        if c.end > limit:
            break
        e = directory.get(keys[j]) if claiming else None
        pick = None
        if e is not None and e.num_tokens == c.num_tokens:
            pick = choose_policy(e, tuple(keys[:j]), mode)
        if pick is None:
            claiming = False
            misses += 1
            continue
        start = max(c.start, num_computed)
        dst_pos = as_tuple(positions[:, start:c.end]) if positions is not None else None
        items.append(LoadItem(keys[j], tuple(token_ids[c.start:c.end]), start - c.start, c.num_tokens, start,
                              pick[1], pick[0], dst_pos))
        hits += 1
    end = items[-1].dst_start + items[-1].src_end - items[-1].src_start if items else num_computed
    return Claim(items, end - num_computed, hits, misses)


@dataclass(frozen=True)
class SaveItem:
    """Save tokens `[start, end)` of the request as chunk `key`, computed after `preceding`."""

    key: bytes
    token_ids: tuple[int, ...]
    start: int
    end: int
    preceding: tuple[bytes, ...]
    is_new: bool  # False: the key is stored already; this is its KV in another context (patch capture)
    positions: tuple[tuple[int, ...], ...] | None = None  # M-RoPE: `[3, end - start]` (None: token indices)


def plan_saves(token_ids: Sequence[int], chunks: Sequence[Chunk], keys: Sequence[bytes], directory: Directory,
               loaded: set[bytes], capture_patches: bool, positions: torch.Tensor | None = None) -> list[SaveItem]:
    """Chunks whose KV this request computed and the store lacks (new keys, or new contexts)."""
    out = []
    pos = (lambda c: as_tuple(positions[:, c.start:c.end])) if positions is not None else (lambda c: None)
    for j, c in enumerate(chunks):
        if keys[j] in loaded:
            continue
        pre = tuple(keys[:j])
        e = directory.get(keys[j])
        if e is None:
            out.append(SaveItem(keys[j], tuple(token_ids[c.start:c.end]), c.start, c.end, pre, True, pos(c)))
        elif (capture_patches and not e.remote and context_signature(pre) not in e.contexts
              and e.num_tokens == c.num_tokens):
            out.append(SaveItem(keys[j], tuple(token_ids[c.start:c.end]), c.start, c.end, pre, False, pos(c)))
    return out
