"""Scheduler-side logic, free of vLLM: chunk keys, the directory of stored chunks, policies, items.

Policies (DESIGN.md), decided per chunk from what actually precedes it in the prompt.  A
*context* is recorded for each KV the store holds of a chunk: the signature of every chunk key
before it (exact match), the last `RECENT` of those keys in order (bounded, for the looser
matches) and the content anchors of the prompt it was computed in (`segment.Anchors`, shared by
every context of that prompt, under a memory budget).  Before a chunk, the prompt holds *stored*
chunks (in the directory) and *gaps* (chunks nobody stored: new text, the chunk straddling a
change point), computed in place.
  exact     the signature of all preceding keys is a recorded one      → relocate only
  survival  the stored chunks before it (the last `MATCH`) appear, in order, in a recorded
            context, and the text of the gaps among them was there too → relocate only
  reorder   the stored chunks before it are all in a recorded context,
            in another order, and so was the gaps' text                → relocate + that context's KV/patch
  blind     anything else                                              → base KV only
Only exact is claimed for a request of fidelity "exact" (`kvreuse.connector.fidelity`); a context
recorded for KV computed after approximate KV has a tainted signature, so it is never exact.
(`recall`, an entry demoted to base + patch, is decided by the worker from what the store serves.)

"The gaps' text was there": every run of gap text that no anchor of the recorded context holds
spans fewer than `NEW_SPAN` tokens (what a change point alone produces: the windows that cross it)
and no media item is missing.  A context whose anchors are unknown (recorded by another instance,
found on disk after a restart, or dropped under the budget) verifies no gap: with gaps before the
chunk it does not count as survival or reorder.
Memory is linear in the number of chunks: a context costs one signature and ≤ `RECENT` keys, and
an entry keeps at most `MAX_CONTEXTS` contexts (least recently recorded or used first out).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import xxhash

from kvreuse.connector.segment import _WINDOW, Anchors, Chunk
from kvreuse.store.keys import ChunkKey, token_bytes

POLICIES = ("exact", "survival", "reorder", "recall", "blind")
RECENT = 64        # preceding keys remembered per context
MATCH = 16         # stored neighbours compared for survival / reorder (the nearest matter most)
MAX_CONTEXTS = 8   # contexts remembered per chunk
NEW_SPAN = _WINDOW + 4      # a run of unseen text this long is new content, not a change point's windows
EDGE = 4  # tokens that key a stored chunk's first and last edge (edge fill, `Directory.head`): its shortest piece
LOOKBACK = 2048             # gap text checked before a chunk, at most (tokens)
ANCHOR_BYTES = 64 << 20     # the directory's budget for prompts' anchors


def context_signature(preceding: Sequence[bytes]) -> bytes:
    """Signature of a context: xxh3-128 over the digests of the preceding chunk keys, in order."""
    h = xxhash.xxh3_128(b"kvreuse-ctx-v2")
    for d in preceding:
        h.update(d)
    return h.digest()


def prefix_signatures(keys: Sequence[bytes]) -> Iterator[bytes]:
    """`context_signature(keys[:j])` for j = 0 .. len(keys) - 1, in O(len(keys))."""
    h = xxhash.xxh3_128(b"kvreuse-ctx-v2")
    for d in keys:
        yield h.digest()
        h.update(d)


@dataclass
class DirEntry:
    """What the scheduler knows of a stored chunk: its length and the contexts recorded for it.

    `contexts`: signature -> the last `RECENT` preceding keys (`()` when only the signature is
    known: entries another instance stored, or found on disk after a restart).  `demoted`: contexts
    whose in-context KV the store dropped for base + patch (what it serves them from is approximate).
    """

    num_tokens: int
    contexts: "OrderedDict[bytes, tuple[bytes, ...]]" = field(default_factory=OrderedDict)
    remote: bool = False
    _sets: dict[bytes, frozenset] = field(default_factory=dict, repr=False)
    # signature -> (anchors of the prompt the context was recorded in, the chunk's start there)
    anchors: dict[bytes, tuple[Anchors, int]] = field(default_factory=dict, repr=False)
    tokens: np.ndarray | None = None  # a text chunk recorded here: its tokens (int32), for edge fill
    edges: tuple[bytes, bytes] = (b"", b"")  # its keys in the directory's head and tail indexes
    demoted: frozenset = frozenset()

    def add(self, sig: bytes, recent: tuple[bytes, ...], anchors: tuple[Anchors, int] | None = None) -> None:
        if anchors is not None:
            self.anchors[sig] = anchors
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
            self.anchors.pop(old, None)

    def key_set(self, sig: bytes) -> frozenset:
        """The keys of a recorded context, as a set (cached)."""
        out = self._sets.get(sig)
        if out is None:
            out = self._sets[sig] = frozenset(self.contexts[sig])
        return out


class Directory:
    """Keys the worker has stored, with their contexts (recorded when a save is planned, forgotten
    when the worker reports a key lost or evicted), and optionally a read-only local view of what
    other instances stored in the shared tier (`remote.record`, a local read).

    Text chunks recorded with their tokens are also found by their edges (`head`, `tail`): the
    first and the last `EDGE` tokens, the most recently recorded chunk per edge.  That is what
    fills the chunk straddling a change point (`plan.plan_segments`): its start is the start of the
    chunk that followed the same text before, its end the end of the one that preceded it.
    """

    def __init__(self, remote=None, anchor_bytes: int = ANCHOR_BYTES) -> None:
        self.entries: dict[bytes, DirEntry] = {}
        self.remote = remote
        self.anchor_bytes = anchor_bytes
        self._prompts: "OrderedDict[int, Anchors]" = OrderedDict()  # anchors in use, least recently recorded first
        self._prompt_bytes = 0
        self._heads: dict[bytes, bytes] = {}  # first EDGE tokens -> digest
        self._tails: dict[bytes, bytes] = {}  # last EDGE tokens -> digest

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

    def record(self, digest: bytes, num_tokens: int, context: bytes, recent: tuple[bytes, ...] = (),
               anchors: tuple[Anchors, int] | None = None) -> None:
        """The worker is storing `digest`'s KV computed after context `context` (last keys `recent`;
        `anchors`: the prompt's content anchors and the chunk's start in it)."""
        e = self.entries.get(digest)
        if e is None or e.num_tokens != num_tokens:
            if e is not None:
                self._unindex(digest, e)
            e = self.entries[digest] = DirEntry(num_tokens)
        e.add(context, tuple(recent[-RECENT:]), anchors)
        if anchors is not None:
            self._keep(anchors[0])

    def record_save(self, item: "SaveItem", anchors: Anchors | None = None, ns: bytes = b"") -> None:
        """`record` a planned save (`plan.plan_saves`); a text chunk is also indexed by its edges, under the
        request's namespace `ns` (`chunk_namespace`: model, cache salt, LoRA adapter, as its key is)."""
        self.record(item.key, item.end - item.start, item.context, item.recent,
                    (anchors, item.start) if anchors is not None else None)
        if item.text and item.end - item.start >= EDGE:
            e = self.entries[item.key]
            if e.tokens is None:
                e.tokens = np.asarray(item.token_ids, dtype=np.int32)
                e.edges = (ns + e.tokens[:EDGE].tobytes(), ns + e.tokens[-EDGE:].tobytes())
                self._heads[e.edges[0]] = item.key
                self._tails[e.edges[1]] = item.key

    def head(self, tokens: np.ndarray, start: int, end: int, ns: bytes = b"") -> tuple[bytes, DirEntry, int] | None:
        """A stored text chunk of namespace `ns` that starts as `tokens[start:end]` does: (digest, entry,
        tokens in common, ≥ 1).  Its key is the `EDGE` tokens from `start`, which may reach past `end`."""
        if start + EDGE > tokens.shape[0]:
            return None
        digest = self._heads.get(ns + tokens[start:start + EDGE].tobytes())
        return self._common(digest, tokens[start:end], True)

    def tail(self, tokens: np.ndarray, start: int, end: int, ns: bytes = b"") -> tuple[bytes, DirEntry, int] | None:
        """A stored text chunk of namespace `ns` that ends as `tokens[start:end]` does: (digest, entry,
        tokens in common, ≥ 1).  Its key is the `EDGE` tokens before `end`, which may reach before `start`."""
        if end < EDGE:
            return None
        digest = self._tails.get(ns + tokens[end - EDGE:end].tobytes())
        return self._common(digest, tokens[start:end], False)

    def _common(self, digest: bytes | None, want: np.ndarray, first: bool) -> tuple[bytes, DirEntry, int] | None:
        e = self.entries.get(digest) if digest is not None else None
        if e is None or e.tokens is None or want.shape[0] == 0:
            return None
        n = min(e.tokens.shape[0], want.shape[0])
        a, b = (e.tokens[:n], want[:n]) if first else (e.tokens[::-1][:n], want[::-1][:n])
        diff = np.flatnonzero(a != b)
        n = int(diff[0]) if diff.shape[0] else n
        return (digest, e, n) if n else None

    def _unindex(self, digest: bytes, e: DirEntry) -> None:
        if e.tokens is not None:
            for index, edge in ((self._heads, e.edges[0]), (self._tails, e.edges[1])):
                if index.get(edge) == digest:
                    del index[edge]

    def _keep(self, a: Anchors) -> None:
        """Hold `a` under the anchor budget; the least recently recorded prompts' anchors are released."""
        if id(a) in self._prompts:
            self._prompts.move_to_end(id(a))
            return
        self._prompts[id(a)] = a
        self._prompt_bytes += a.nbytes
        while self._prompt_bytes > self.anchor_bytes and len(self._prompts) > 1:
            _, old = self._prompts.popitem(last=False)
            self._prompt_bytes -= old.nbytes
            old.release()

    def demote(self, digest: bytes) -> None:
        """The store now holds `digest` as base + patch: its contexts recorded so far are no longer exact."""
        e = self.entries.get(digest)
        if e is not None:
            e.demoted = frozenset(e.contexts)

    def forget(self, digest: bytes) -> None:
        e = self.entries.pop(digest, None)
        if e is not None:
            self._unindex(digest, e)

    def unrecord(self, digest: bytes, context: bytes) -> None:
        """Undo `record` of one context (its save was dropped); an entry left without contexts is forgotten."""
        e = self.entries.get(digest)
        if e is None:
            return
        e.contexts.pop(context, None)
        e._sets.pop(context, None)
        e.anchors.pop(context, None)
        if not e.contexts:
            self.forget(digest)


def _is_subsequence(short: Sequence[bytes], long: tuple[bytes, ...]) -> bool:
    i = 0
    try:
        for x in short:
            i = long.index(x, i) + 1
    except ValueError:
        return False
    return True


class GapText:
    """Tokens `[lo, hi)` of a prompt hold gaps: was their text in a recorded context?  (One per chunk
    checked; the recorded prompts' lookups are shared through `seen`.)"""

    __slots__ = ("anchors", "lo", "hi", "seen")

    def __init__(self, anchors: Anchors, lo: int, hi: int, seen: dict) -> None:
        self.anchors, self.lo, self.hi, self.seen = anchors, lo, hi, seen

    @property
    def evidence(self) -> bool:
        """The span holds anchors at all (no anchor: nothing to tell old text from new)."""
        a = self.anchors
        i, j = np.searchsorted(a.pos, (self.lo, self.hi))
        return bool(j > i)

    def was_there(self, recorded: tuple[Anchors, int] | None) -> bool:
        if recorded is None or not recorded[0].known:
            return False  # nothing to verify against
        rec, before = recorded
        a = self.anchors
        i, j = np.searchsorted(a.pos, (self.lo, self.hi))
        if i == j:
            return True
        first = self.seen.get(id(rec))
        if first is None:
            first = self.seen[id(rec)] = rec.first_seen(a.hashes)
        missing = np.flatnonzero(first[i:j] >= before)
        if missing.shape[0] == 0:
            return True
        if a.media[i:j][missing].any():
            return False  # a media item the context did not hold
        # runs of consecutive missing anchors: a change point misses fewer than NEW_SPAN positions
        pos = a.pos[i:j][missing]
        brk = np.flatnonzero(np.diff(missing) > 1)
        starts = np.concatenate(([0], brk + 1))
        ends = np.concatenate((brk, [missing.shape[0] - 1]))
        return bool((pos[ends] - pos[starts] < NEW_SPAN).all())


def choose_policy(entry: DirEntry, sig: bytes, stored: Sequence[bytes], fidelity: str,
                  gaps: GapText | None = None, text: GapText | None = None) -> tuple[str, bytes] | None:
    """(policy, recorded context signature to read) for a chunk; None = not claimed.

    `fidelity` "exact" (`kvreuse.connector.fidelity`) claims only the exact policy.

    `sig`: signature of every key before the chunk; `stored`: the stored chunks among them (the
    last `MATCH`, in order; gaps left out); `gaps`: the gap text among them (None: no gaps);
    `text`: all the text they span, gaps or not (None: no anchors).
    Among the recorded contexts that contain every stored neighbour (and held the gaps' text), the
    one with the fewest extra keys wins, survival (same order) first.  A context that lacks some
    stored neighbours as keys still fits when it held their text (`text`): a chunk first stored
    where a change point moved the content-defined cuts (the chunk straddling it, saved later, in
    another prompt) is new as a key but old as text, and the chunks after it are as they were.
    """
    if sig in entry.contexts:
        if sig not in entry.demoted:
            return "exact", sig
        return None if fidelity == "exact" else ("recall", sig)  # base + patch: approximate
    if fidelity == "exact":
        return None
    # a context with no recorded keys is the isolated one, except on a remote entry saved without them
    have = frozenset(stored)
    fits = []
    for s, rec in entry.contexts.items():
        if not (rec or not (have or entry.remote)):
            continue
        keys = entry.key_set(s)
        if have <= keys:
            if gaps is None or gaps.was_there(entry.anchors.get(s)):
                fits.append((len(rec) - len(have), s, stored))
        elif text is not None and text.evidence and text.was_there(entry.anchors.get(s)):
            held = [k for k in stored if k in keys]
            fits.append((len(rec) - len(held), s, held))
    fits.sort(key=lambda f: (f[0], f[1]))
    for _, s, held in fits:
        if _is_subsequence(held, entry.contexts[s]):
            return "survival", s
    if fits:
        return "reorder", fits[0][1]
    if not entry.contexts:
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
    # edge fill: the prompt's own chunks that pieces of other chunks cover whole (not saved as computed)
    within: tuple[bytes, ...] = ()

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
    text: bool = True  # no media item in it (only text chunks are indexed by their edges)


def chunk_namespace(model_digest: bytes, cache_salt: str | None, lora: bytes | None = None) -> bytes:
    """What separates chunk keys besides their content (model, cache salt, LoRA adapter), as 16 bytes: edge
    fill only finds chunks of the request's own namespace, as an exact key lookup does."""
    return ChunkKey.of(model_digest, [], cache_salt=cache_salt, lora=lora).digest


def chunk_keys(token_ids: Sequence[int], chunks: Sequence[Chunk], model_digest: bytes,
               cache_salt: str | None, lora: bytes | None = None) -> list[bytes]:
    """Content key digest of each chunk (model fingerprint, salt, LoRA adapter, tokens, media identifiers).

    `lora`: the request's adapter identity (`kvreuse.store.keys.AdapterKeys.of`), None for the base model.
    """
    base = ChunkKey.namespace_hasher(model_digest, cache_salt=cache_salt, lora=lora)
    tb = token_bytes(token_ids)  # 8 bytes a token: each chunk hashes a slice (as `ChunkKey.of` its own tokens)
    return [ChunkKey.finish(base.copy(), tb[8 * c.start:8 * c.end], c.mm_ids) for c in chunks]
