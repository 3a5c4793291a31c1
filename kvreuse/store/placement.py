"""Pressure rules between tiers: make room (demote, then evict), spill down, promote up.

The :class:`TierStack` owns the tiers of one store; every method is called with the store's
lock held.  Rules (the store's docstring gives the why):

* ``make_room(i, n)``: memory tier i frees n bytes of budget — demote entries holding in-context
  KV, lowest priority first, then evict lowest priority first, spilling each victim to tier i+1.
* ``spill``: an evicted memory entry goes to the next memory tier that can hold it, else to
  disk (skipped when the disk already holds the same content); a disk victim goes to Redis
  when Redis lacks it.
* ``promote``: a hit in a lower memory tier moves to the top tier when it can be made to fit.
"""

from __future__ import annotations

from typing import Any

from kvreuse.store.entry import ChunkEntry
from kvreuse.store.keys import ChunkKey
from kvreuse.store.stats import StoreStats
from kvreuse.store.tiers import DiskTier, MemoryTier, RedisTier

_AUTO = "auto"


class TierStack:
    """The tiers of one store, fastest first, and the moves between them."""

    def __init__(self, memory: list[MemoryTier], disk: DiskTier | None, redis: RedisTier | None,
                 stats: StoreStats, fit_patch: Any) -> None:
        self.memory, self.disk, self.redis, self.stats = memory, disk, redis, stats
        self._fit = fit_patch

    def make_room(self, i: int, n: int, protect: ChunkKey | None = None) -> bool:
        t = self.memory[i]
        if t.used_bytes + n <= t.budget_bytes:
            return True
        if n > t.budget_bytes - sum(t.reserved.values()) - (t._sizes.get(protect, 0) if protect else 0):
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

    def demote(self, t: MemoryTier, key: ChunkKey) -> int:
        freed = t.entries[key].demote(self.fit_fn())
        t.resized(key)
        self.stats.demotions += 1
        self.stats.demoted_bytes += freed
        return freed

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
            if self.disk_put(e):
                self.stats.bytes_moved += n

    def disk_put(self, e: ChunkEntry) -> bool:
        n = self.disk.put(e, self.disk_room)
        ts = self.stats.tier("disk")
        if n:
            ts.puts, ts.bytes_written = ts.puts + 1, ts.bytes_written + n
        else:
            ts.rejected_puts += 1
        return bool(n)

    def disk_room(self, n: int) -> bool:
        d = self.disk
        while d.used_bytes + n > d.budget_bytes:
            victim = d.policy.peek()
            if victim is None:
                return False
            h = d.index[victim]
            if self.redis is not None and not self.redis.contains(victim):
                blob = d.read_blob(victim)
                if blob is not None:
                    self.redis.put_blob(victim, blob, cost=h.recompute_cost, hits=h.hits)
            d.remove(victim, evicted=True)
            self.count_eviction("disk", h.total_bytes)
        return True

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
        if self._fit == _AUTO:
            try:
                from kvreuse.patch import fit_patch
            except ImportError:
                fit_patch = None
            self._fit = fit_patch
        return self._fit

