"""Pressure rules between tiers: make room (demote, then evict), spill down, promote up.

The :class:`TierStack` owns the tiers of one store; every method is called with the store's
lock held, and none of them does slow work: what would be slow is queued in ``work`` for the
store to run after it releases the lock (:class:`FitJob`, :class:`SpillJob`).  Rules (the
store's docstring gives the why):

* ``place``: a new entry goes to the fastest memory tier that can make room for it, else to disk;
  ``merge`` adds a second copy's contexts and patches to the entry in memory.
* ``make_room(i, n)``: memory tier i frees n bytes of budget — demote entries holding in-context
  KV, lowest priority first, then evict lowest priority first, spilling each victim to tier i+1.
  Demotion drops in-context KV at once; a context without a patch yet gets a ``FitJob``, which
  keeps that KV readable (``fitting``) until the patch is published or the fit is given up.
* ``spill``: an evicted memory entry goes to the next memory tier that can hold it, else to
  disk (skipped when the disk already holds the same content) through a ``SpillJob``; until that
  lands the entry stays readable in ``spilling``.  An entry no tier keeps is recorded in ``lost``.
* ``promote``: a hit in a lower memory tier moves to the top tier when it can be made to fit.

``lost`` and ``demoted`` record keys for the connector, which tells the scheduler's directory.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from kvreuse.store.entry import ChunkEntry
from kvreuse.store.keys import ChunkKey
from kvreuse.store.stats import StoreStats
from kvreuse.store.tiers import DiskTier, MemoryTier, RedisTier

AUTO_FIT = "auto"  # fit_patch default: kvreuse.fit_patch when kvreuse.patch imports, else no patches
_EVENT_LOG = 1 << 16  # keys kept for the connector between two reads (older ones are dropped)


@dataclass
class FitJob:
    """Fit the patch of a demoted context of ``base``: ``k, v`` its in-context KV.

    k, v: ``[num_layers, num_tokens, num_kv_heads, head_dim]``, computed at ``positions`` (None: ``base``'s
    positions); the fit relocates them into ``base``'s frame first.
    """

    key: ChunkKey
    context: bytes
    k: torch.Tensor
    v: torch.Tensor
    base: ChunkEntry
    positions: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def as_entry(self) -> ChunkEntry:
        """The chunk as computed in ``context`` (its KV as base), at the positions it was computed at."""
        return dataclasses.replace(self.base, k=self.k, v=self.v, context=self.context, in_context={}, patches={},
                                   preceding={}, frames={},
                                   positions=self.base.positions if self.positions is None else self.positions)


@dataclass
class SpillJob:
    """Write an entry evicted from memory to the disk tier (``copy``: a write-behind copy of one kept in memory)."""

    entry: ChunkEntry
    copy: bool = False

    @property
    def nbytes(self) -> int:
        return self.entry.nbytes


class TierStack:
    """The tiers of one store, fastest first, and the moves between them."""

    def __init__(self, memory: list[MemoryTier], disk: DiskTier | None, redis: RedisTier | None,
                 stats: StoreStats, fit_patch: Any) -> None:
        self.memory, self.disk, self.redis, self.stats = memory, disk, redis, stats
        self._fit = fit_patch
        self.work: list[FitJob | SpillJob] = []  # slow work for the store to run outside its lock
        self.spilling: dict[ChunkKey, ChunkEntry] = {}  # evicted, on their way to disk (still served)
        self.fitting: dict[tuple[ChunkKey, bytes], FitJob] = {}  # demoted contexts awaiting a patch (still served)
        self.lost: deque[ChunkKey] = deque(maxlen=_EVENT_LOG)  # left every tier of this store
        self.demoted: deque[ChunkKey] = deque(maxlen=_EVENT_LOG)  # in-context KV dropped (patches stay)
        self.rope: Any = None  # the model's RopeSpec, from the first ingest that names one: relocates KV kept in a
        # frame of its own into its base's before a demotion fits its patch (without it that context reads as base)

    def make_room(self, i: int, n: int, protect: ChunkKey | None = None) -> bool:
        t = self.memory[i]
        if t.used_bytes + n <= t.budget_bytes:
            return True
        if n > t.budget_bytes - sum(t.reserved.values()) - (t.size_of(protect) if protect else 0):
            return False
        for k in t.policy.victims():  # demote first, lowest priority first
            if t.used_bytes + n <= t.budget_bytes:
                return True
            if t.entries[k].demotable:
                self.demote(t, k)
        while t.used_bytes + n > t.budget_bytes:
            victim = t.policy.peek()
            if victim == protect:
                victim = next((k for k in t.policy.victims() if k != protect), None)
            if victim is None:
                return False
            e = t.pop(victim, evicted=True)
            self.count_eviction(t.name, e.nbytes)
            self.spill(i + 1, e)
        return True

    def place(self, entry: ChunkEntry) -> ChunkEntry | None:
        """Insert ``entry``, a key no memory tier holds, into the fastest memory tier that can make room for
        it; the stored entry (adopted onto that tier's device), or None: no memory tier can hold it (with
        a disk tier it is then on its way to disk)."""
        n = entry.nbytes
        for i, t in enumerate(self.memory):
            if n <= t.budget_bytes and self.make_room(i, n):
                stored = t.adopt(entry)
                t.insert(stored, n)
                ts = self.stats.tier(t.name)
                ts.puts, ts.bytes_written = ts.puts + 1, ts.bytes_written + n
                return stored
            self.stats.tier(t.name).rejected_puts += 1
        if self.disk is not None:
            self.spilling[entry.key] = entry
            self.work.append(SpillJob(entry))
        return None

    def merge(self, i: int, new: ChunkEntry) -> bool:
        """Add to memory tier i's entry of ``new.key`` the contexts (KV) and patches of ``new`` it lacks, all
        or none, as room allows; whether it gained a context's KV (the shared copy must learn it)."""
        t, e = self.memory[i], self.memory[i].entries[new.key]
        add_ctx = {c: kv for c, kv in new.in_context.items() if c != e.context and c not in e.in_context}
        if new.context != e.context and new.context not in e.in_context:
            add_ctx[new.context] = (new.k, new.v)
        add_patch = {c: p for c, p in new.patches.items() if c not in e.patches}
        frames = {c: new.frames.get(c, new.positions) for c in add_ctx}  # where each was computed
        grow = sum(e.context_nbytes(k, v, frames[c]) for c, (k, v) in add_ctx.items())
        grow += sum(int(p.nbytes) for p in add_patch.values())
        if not grow or not self.make_room(i, grow, protect=new.key):
            return False
        for c, (k, v) in add_ctx.items():
            e.add_context_kv(c, k, v, frames[c])
        for c, p in add_patch.items():
            e.add_patch(c, p)
        for c in (*add_ctx, *add_patch):
            if c in new.preceding and c not in e.preceding:
                e.preceding[c] = new.preceding[c]
        t.resized(new.key)
        return bool(add_ctx)

    def demote(self, t: MemoryTier, key: ChunkKey) -> int:
        e = t.entries[key]
        before = e.nbytes
        fit = self.fit_fn()
        for ctx, ck, cv, pos in e.drop_context_kv():
            if fit is not None and (pos is None or self.rope is not None):
                w = self.fitting[(key, ctx)] = FitJob(key, ctx, ck, cv, e, pos)
                self.work.append(w)
        t.resized(key)
        freed = before - e.nbytes
        self.stats.demotions += 1
        self.stats.demoted_bytes += freed
        self.demoted.append(key)
        return freed

    def fitted(self, w: FitJob) -> None:
        """``w``'s patch is published, or will not be (failed, dropped): its KV is no longer served."""
        if self.fitting.get((w.key, w.context)) is w:
            del self.fitting[(w.key, w.context)]

    def spill(self, j: int, e: ChunkEntry) -> None:
        n = e.nbytes
        if j < len(self.memory):
            t = self.memory[j]
            if n <= t.budget_bytes and self.make_room(j, n):
                t.insert(t.adopt(e))
                self.stats.bytes_moved += n
                return
        if self.disk is not None:
            h = self.disk.index.get(e.key)
            if h is not None and h.contexts == tuple(e.in_context) and h.patch_contexts == tuple(e.patches):
                return  # the disk already has this content
            self.spilling[e.key] = e
            self.work.append(SpillJob(e))
            return
        self.lost.append(e.key)

    def count_eviction(self, tier: str, n: int) -> None:
        ts = self.stats.tier(tier)
        ts.evictions, ts.evicted_bytes = ts.evictions + 1, ts.evicted_bytes + n

    def promote(self, i: int, e: ChunkEntry) -> ChunkEntry:
        top, n = self.memory[0], e.nbytes
        if n > top.budget_bytes - sum(top.reserved.values()):
            return e
        self.memory[i].pop(e.key)
        ok = self.make_room(0, n)
        assert ok
        e = top.adopt(e)
        top.insert(e)
        self.stats.bytes_moved += n
        return e

    def fit_fn(self) -> Any:
        if self._fit == AUTO_FIT:
            try:
                from kvreuse.patch import fit_patch
            except ImportError:
                fit_patch = None
            self._fit = fit_patch
        return self._fit

