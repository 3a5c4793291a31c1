"""Scheduler-side logic, free of vLLM: chunk keys, the directory of stored chunks, policies, items.

Policies (DESIGN.md), decided per chunk from what actually precedes it in the prompt.  A
*context* is recorded for each KV the store holds of a chunk: the signature of every chunk key
before it (exact match) and the last `RECENT` of those keys in order (bounded, for the looser
matches).  Before a chunk, the prompt holds *stored* chunks (in the directory) and *gaps*
(chunks nobody stored: new text, the chunk straddling a change point), computed in place.
  exact     the signature of all preceding keys is a recorded one      → relocate only
  survival  the stored chunks before it (the last `MATCH`) appear, in order, in a recorded
            context (gaps and dropped chunks aside)                    → relocate only
  reorder   the stored chunks before it are all in a recorded context,
            in another order                                           → relocate + that context's KV/patch
  blind     anything else                                              → base KV only, or not claimed
            when the operator requires patched-or-exact reuse
(`recall`, an entry demoted to base + patch, is decided by the worker from what the store serves.)
Memory is linear in the number of chunks: a context costs one signature and ≤ `RECENT` keys, and
an entry keeps at most `MAX_CONTEXTS` contexts (least recently recorded or used first out).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import xxhash

from kvreuse.connector.segment import Chunk
from kvreuse.store.keys import ChunkKey

POLICIES = ("exact", "survival", "reorder", "recall", "blind")
RECENT = 64        # preceding keys remembered per context
MATCH = 16         # stored neighbours compared for survival / reorder (the nearest matter most)
MAX_CONTEXTS = 8   # contexts remembered per chunk


def context_signature(preceding: Sequence[bytes]) -> bytes:
    """Signature of a context: xxh3-128 over the digests of the preceding chunk keys, in order."""
    h = xxhash.xxh3_128(b"kvreuse-ctx-v1")
    for d in preceding:
        h.update(d)
    return h.digest()


def prefix_signatures(keys: Sequence[bytes]) -> Iterator[bytes]:
    """`context_signature(keys[:j])` for j = 0 .. len(keys) - 1, in O(len(keys))."""
    h = xxhash.xxh3_128(b"kvreuse-ctx-v1")
    for d in keys:
        yield h.digest()
        h.update(d)


@dataclass
class DirEntry:
    """What the scheduler knows of a stored chunk: its length and the contexts recorded for it.

    `contexts`: signature -> the last `RECENT` preceding keys (`()` when only the signature is
    known: entries another instance stored, or found on disk after a restart).
    """

    num_tokens: int
    contexts: "OrderedDict[bytes, tuple[bytes, ...]]" = field(default_factory=OrderedDict)
    remote: bool = False
    _sets: dict[bytes, frozenset] = field(default_factory=dict, repr=False)

    def add(self, sig: bytes, recent: tuple[bytes, ...]) -> None:
        if sig in self.contexts:
            self.contexts.move_to_end(sig)
            if recent and not self.contexts[sig]:
                self.contexts[sig] = recent
                self._sets.pop(sig, None)
            return
        self.contexts[sig] = recent
        while len(self.contexts) > MAX_CONTEXTS:
            old, _ = self.contexts.popitem(last=False)
            self._sets.pop(old, None)

    def key_set(self, sig: bytes) -> frozenset:
        """The keys of a recorded context, as a set (cached)."""
        out = self._sets.get(sig)
        if out is None:
            out = self._sets[sig] = frozenset(self.contexts[sig])
        return out


class Directory:
    """Keys the worker has stored, with their contexts (recorded when a save is planned, forgotten
    when the worker reports a key lost or evicted), and optionally a read-only local view of what
    other instances stored in the shared tier (`remote.record`, a local read)."""

    def __init__(self, remote=None) -> None:
        self.entries: dict[bytes, DirEntry] = {}
        self.remote = remote

    def __contains__(self, digest: bytes) -> bool:
        return self.get(digest) is not None

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, digest: bytes) -> DirEntry | None:
        e = self.entries.get(digest)
        if e is None and self.remote is not None:
            r = self.remote.record(digest)
            if r is not None:  # preceding keys travel with the shared tier's record where they were saved
                e = DirEntry(r.num_tokens, OrderedDict((s, tuple(r.preceding.get(s, ())[-RECENT:]))
                                                       for s in r.contexts[-MAX_CONTEXTS:]), remote=True)
        return e

    def record(self, digest: bytes, num_tokens: int, context: bytes, recent: tuple[bytes, ...] = ()) -> None:
        """The worker is storing `digest`'s KV computed after context `context` (last keys `recent`)."""
        e = self.entries.get(digest)
        if e is None or e.num_tokens != num_tokens:
            e = self.entries[digest] = DirEntry(num_tokens)
        e.add(context, tuple(recent[-RECENT:]))

    def forget(self, digest: bytes) -> None:
        self.entries.pop(digest, None)


def _is_subsequence(short: Sequence[bytes], long: tuple[bytes, ...]) -> bool:
    i = 0
    try:
        for x in short:
            i = long.index(x, i) + 1
    except ValueError:
        return False
    return True


def choose_policy(entry: DirEntry, sig: bytes, stored: Sequence[bytes], mode: str) -> tuple[str, bytes] | None:
    """(policy, recorded context signature to read) for a chunk; None = not claimed.

    `sig`: signature of every key before the chunk; `stored`: the stored chunks among them (the
    last `MATCH`, in order; gaps left out).  Among the recorded contexts that contain every
    stored neighbour, the one with the fewest extra keys wins, survival (same order) first.
    """
    if sig in entry.contexts:
        return "exact", sig
    # a context with no recorded keys is the isolated one, except on a remote entry saved without them
    have = frozenset(stored)
    fits = sorted((len(rec) - len(have), s) for s, rec in entry.contexts.items()
                  if (rec or not (have or entry.remote)) and have <= entry.key_set(s))
    for _, s in fits:
        if _is_subsequence(stored, entry.contexts[s]):
            return "survival", s
    if fits:
        return "reorder", fits[0][1]
    if mode == "patched_or_exact" or not entry.contexts:
        return None
    return "blind", next(reversed(entry.contexts))


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

    @property
    def dst_end(self) -> int:
        return self.dst_start + self.num_tokens


@dataclass(frozen=True)
class SaveItem:
    """Save tokens `[start, end)` of the request as chunk `key`, computed after context `context`."""

    key: bytes
    token_ids: tuple[int, ...]
    start: int
    end: int
    context: bytes  # signature of every chunk key before it
    is_new: bool    # False: the key is stored already; this is its KV in another context (patch capture)
    positions: tuple[tuple[int, ...], ...] | None = None  # M-RoPE: `[3, end - start]` (None: token indices)
    recent: tuple[bytes, ...] = ()  # the last `RECENT` keys before it (the directory's, and persisted with the entry)


def chunk_keys(token_ids: Sequence[int], chunks: Sequence[Chunk], model_digest: bytes,
               cache_salt: str | None, lora: bytes | None = None) -> list[bytes]:
    """Content key digest of each chunk (model fingerprint, salt, LoRA adapter, tokens, media identifiers).

    `lora`: the request's adapter identity (`kvreuse.store.keys.AdapterKeys.of`), None for the base model.
    """
    return [ChunkKey.of(model_digest, list(token_ids[c.start:c.end]), cache_salt=cache_salt, mm_ids=c.mm_ids,
                        lora=lora).digest for c in chunks]
