"""The store's read path: where a chunk is found, and what a context reads.

Tiers are asked fastest first.  A memory hit is served at once (a host hit is promoted to the
device tier); so is an entry on its way to disk (``tiers.spilling``) and a chunk still queued for
ingest (from the bytes handed over).  A disk or Redis hit starts a load (:class:`~kvreuse.store.
rehydrate.Loader`), or joins the one under way for that key.  Every hit is verified against the
stored token ids; a mismatch, a corrupt copy or an unreachable Redis is a miss (counted), never an
error.

What a context reads (:meth:`Lookup.get`): its own KV or its patch over the base as the entry
holds them (``ChunkView.how``), and as long as the store holds that KV anywhere — still queued for
ingest, or demoted and awaiting its patch fit — that KV itself; base KV only when neither its KV
nor its patch is held.  A lookup with a ``timeout`` waits no longer than that for a slow tier
(Redis' answer, a load's bytes): past it the lookup is a miss, counted in ``load_timeouts``, and
the load goes on (it lands in memory for later lookups).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Callable, Sequence

import torch

from kvreuse.store.entry import ChunkEntry, ChunkView
from kvreuse.store.ingest import Ingester
from kvreuse.store.keys import ChunkKey, token_bytes
from kvreuse.store.placement import TierStack
from kvreuse.store.rehydrate import BlobReader, ChunkLoadError, Loader, Rehydration
from kvreuse.store.stats import StoreStats

Tokens = Sequence[int] | torch.Tensor


class Lookup:
    """The lookups of one store.  ``lock`` is the store's; ``settle()`` runs after every fetch, outside
    the lock (the store queues there what making room for a load deferred)."""

    def __init__(self, lock: threading.RLock, tiers: TierStack, stats: StoreStats, ingester: Ingester,
                 loader: Loader, settle: Callable[[], None]) -> None:
        self.lock, self.tiers, self.stats = lock, tiers, stats
        self.ingester, self.loader, self.settle = ingester, loader, settle

    def contains(self, key: ChunkKey, token_ids: Tokens | None = None) -> str | None:
        """See :meth:`ChunkStore.contains`."""
        tok = None if token_ids is None else token_bytes(token_ids)
        ok = lambda stored: tok is None or token_bytes(stored) == tok  # noqa: E731
        tiers = self.tiers
        with self.lock:
            for t in tiers.memory:
                if key in t:
                    return t.name if ok(t.entries[key].token_ids) else None
            e = tiers.spilling.get(key)
            if e is not None:
                return "spill" if ok(e.token_ids) else None
            h = self.loader.inflight.get(key)
            if h is not None:
                return h.source if ok(h.token_ids) else None
            if tiers.disk is not None and key in tiers.disk:
                return "disk" if ok(tiers.disk.index[key].token_ids) else None
            e = self.ingester.pending_entry(key)
            if e is not None:
                return "ingest" if ok(e.token_ids) else None
        if tiers.redis is not None:
            r = tiers.redis.open(key)
            if r is not None:
                r.close()
                return "redis" if ok(r.header.token_ids) else None
        return None

    def fetch(self, key: ChunkKey, token_ids: Tokens, *, timeout: float | None = None) -> Rehydration | None:
        """See :meth:`ChunkStore.fetch`."""
        t0 = time.perf_counter()
        try:
            return self._fetch(key, token_bytes(token_ids), t0, timeout)
        finally:
            self.settle()  # what making room deferred runs in the background, never here
            self.stats.lookup_seconds.observe(time.perf_counter() - t0)

    def _fetch(self, key: ChunkKey, tok: bytes, t0: float, timeout: float | None) -> Rehydration | None:
        tiers, stats = self.tiers, self.stats
        with self.lock:
            stats.lookups += 1
            for i, t in enumerate(tiers.memory):
                e = t.entries.get(key)
                if e is None:
                    stats.tier(t.name).misses += 1
                    continue
                if token_bytes(e.token_ids) != tok:
                    return self._mismatch()
                e.touch()
                t.touched(key)
                stats.tier(t.name).hits += 1
                return Rehydration.completed(tiers.promote(i, e) if i else e, t.name)
            e = tiers.spilling.get(key)
            if e is not None:  # on its way to disk: its bytes are still here
                return Rehydration.completed(e, "spill") if token_bytes(e.token_ids) == tok else self._mismatch()
            h = self.loader.inflight.get(key)
            if h is not None:
                return self._join(h, tok)
            if tiers.disk is not None:
                reader = tiers.disk.open(key)
                if reader is not None:
                    return self._start_load(key, tok, reader, "disk", t0)
                stats.tier("disk").misses += 1
            e = self.ingester.pending_entry(key)
            if e is not None:  # a new chunk still queued for ingest: served from the bytes handed over, no wait
                return Rehydration.completed(e, "ingest") if token_bytes(e.token_ids) == tok else self._mismatch()
        reader = self.loader.open_remote(key, timeout) if tiers.redis is not None else None  # network: no lock
        if reader is None:
            if tiers.redis is not None:
                stats.tier("redis").misses += 1
            stats.misses += 1
            return None
        with self.lock:
            h = self.loader.inflight.get(key)  # another lookup started it while we were away
            if h is not None:
                reader.close()
                return self._join(h, tok)
            return self._start_load(key, tok, reader, "redis", t0)

    def _join(self, h: Rehydration, tok: bytes) -> Rehydration | None:
        """With the lock held: the load under way ``h``, shared by this lookup (None: another chunk's tokens)."""
        if token_bytes(h.token_ids) != tok:
            return self._mismatch()
        self.stats.shared_rehydrations += 1
        return h

    def _start_load(self, key: ChunkKey, tok: bytes, reader: BlobReader, source: str,
                    t0: float) -> Rehydration | None:
        """With the lock held: verify ``reader``'s header, then load it."""
        if token_bytes(reader.header.token_ids) != tok:
            reader.close()
            return self._mismatch()
        return self.loader.start(key, reader, source, t0)

    def get(self, key: ChunkKey, token_ids: Tokens, *, context: bytes | str | None = None,
            tokens: slice | None = None, layers: slice | None = None, timeout: float | None = None,
            label: str | None = None) -> ChunkView | None:
        """See :meth:`ChunkStore.get`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        h = self.fetch(key, token_ids, timeout=timeout)
        if h is None:
            return None
        try:
            e = h.result(None if deadline is None else max(deadline - time.monotonic(), 0.0))
        except ChunkLoadError:
            return None
        except TimeoutError:
            with self.lock:
                self.stats.load_timeouts += 1
            return None
        with self.lock:
            view, source = e.view(context, tokens=tokens, layers=layers), h.source
            own = self._unpublished(e, view.context) if view.how != "exact" else None
            if own is not None:  # the context's own KV, not yet stored or not yet a patch: served as it is
                view, source = own[0].view(view.context, tokens=tokens, layers=layers), own[1]
            view = dataclasses.replace(view, source=source)
            self.count_hit(label or view.how)
        return view

    def _unpublished(self, e: ChunkEntry, ctx: bytes) -> tuple[ChunkEntry, str] | None:
        """With the lock held: KV of ``e``'s chunk computed in ``ctx`` that the store holds outside
        the entry, with where: still queued for ingest, or demoted and awaiting its patch fit."""
        own = self.ingester.pending_entry(e.key, ctx)
        if own is not None and token_bytes(own.token_ids) == token_bytes(e.token_ids):
            return own, "ingest"
        w = self.tiers.fitting.get((e.key, ctx))
        if w is not None and token_bytes(w.base.token_ids) == token_bytes(e.token_ids):
            return w.as_entry(), "demoting"
        return None

    def count_hit(self, label: str) -> None:
        """With the lock held: count a hit served under ``label``."""
        self.stats.hits_by_policy[label] = self.stats.hits_by_policy.get(label, 0) + 1

    def _mismatch(self) -> None:
        self.stats.token_mismatches += 1
        self.stats.misses += 1
        return None
