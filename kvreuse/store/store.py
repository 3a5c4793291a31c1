"""The chunk store: content-addressed entries across device, host, disk and Redis tiers.

Placement.  A new entry goes to the fastest memory tier it fits in.  Memory tiers are exclusive
(an entry lives in one of them); disk and Redis may hold copies.  With a disk tier, every entry
stored in memory is also copied to disk by the background thread (write-behind: bounded by the
background lane, dropped and counted when it is full), so a restarted store starts warm.  Redis is written through
(asynchronously, on a writer thread) so the other stores of a deployment see new chunks at once,
and written again when an entry gains a context computed in it (see :mod:`kvreuse.store.writethrough`).

Saving.  :meth:`ChunkStore.ingest` is the one call a saver makes: it queues the chunk's KV on a
bounded background queue and returns at once (a full queue drops the chunk and counts it).  The
background thread decides what the KV is — a new entry, or a stored chunk seen in a new context —
and stores it (:mod:`kvreuse.store.ingest`).

Pressure.  Before an insert, the target tier makes room: first it *demotes* entries that hold
full in-context KV (lowest priority first: that KV is dropped, its context keeps its patch, or
gets one fitted in the background), then it *evicts* by the tier's policy (see
:mod:`kvreuse.store.policy`), spilling each victim to the next tier down (device → host → disk →
Redis).  Every tier's budget is checked on insert and never exceeded; bytes of an entry still
being loaded are reserved up front.  Keys that leave the store, and keys demoted, are recorded
for the connector (:meth:`ChunkStore.take_events`).

Lookups (:mod:`kvreuse.store.lookup`).  Memory hits, entries on their way to disk and chunks still
queued for ingest are served at once; a disk or Redis hit returns a
:class:`~kvreuse.store.rehydrate.Rehydration` filled layer by layer on an I/O thread into the
fastest memory tier, shared by concurrent lookups of the key (:mod:`kvreuse.store.rehydrate`).  A
mismatch, a corrupt copy or an unreachable Redis is a miss (counted), never an error.

Thread safety: all public methods may be called from any thread.  Metadata is guarded by one lock
that is held only to look up and to publish: patch fits (SVD), disk writes (fsync) and Redis I/O
run outside it, on the background thread (or, for the synchronous :meth:`put`, :meth:`demote`
and :meth:`evict`, on the caller's thread after the lock is released).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from kvreuse.store.background import Background
from kvreuse.store.config import StoreConfig
from kvreuse.store.entry import ISOLATED, ChunkEntry, ChunkView, as_signature
from kvreuse.store.ingest import Ingester, IngestBatch, IngestChunk, IngestJob
from kvreuse.store.keys import ChunkKey, ModelFingerprint
from kvreuse.store.lookup import Lookup, Tokens
from kvreuse.store.placement import AUTO_FIT, SpillJob, TierStack
from kvreuse.store.policy import make_policy
from kvreuse.store.rehydrate import Loader, Rehydration
from kvreuse.store.spill import DiskWriter
from kvreuse.store.stats import StoreStats
from kvreuse.store.tiers import DiskTier, MemoryTier, RedisTier, device_tier, host_tier
from kvreuse.store.work import DeferredWork
from kvreuse.store.writethrough import RedisWriteThrough


@dataclass
class StoreEvents:
    """Keys the scheduler's directory must hear of: ``evicted`` left this store, ``demoted`` lost in-context KV."""

    evicted: list[ChunkKey]
    demoted: list[ChunkKey]


class ChunkStore:
    """Chunk KV entries under per-tier byte budgets.

    Args:
        config: tier budgets and locations.
        model: the model fingerprint (``ModelFingerprint`` or its 16-byte digest); entries of any
            other fingerprint are never served.
        policy: eviction policy of every tier, ``"cost"`` (GDSF, default) or ``"lru"``.
        fit_patch: ``fit(delta_k, delta_v, *, base_k, base_v, dtype) -> Patch`` used at ingest and by
            demotion; default ``kvreuse.fit_patch``; ``None`` keeps no patches (demotion drops KV).
        capture_patches: fit a patch for every new context at ingest (default True); False: only for one
            whose KV finds no room, the others when demotion drops their KV.
        device: device of the device tier (default: the current CUDA device, else CPU).
        redis_write_through: publish every put to Redis (default True).
        ingest_items, ingest_bytes: bounds of the ingest queue (queued + running chunks).
        background_bytes: bound of the store's own background work (spills, demotion fits);
            beyond it an evicted entry is dropped instead of written to disk.
    """

    def __init__(self, config: StoreConfig, model: bytes | ModelFingerprint, *, policy: str = "cost",
                 fit_patch: Any = AUTO_FIT, capture_patches: bool = True, device: torch.device | str | None = None,
                 io_threads: int = 2, redis_namespace: str = "kvreuse:", redis_write_through: bool = True,
                 write_through_pending_bytes: int = 1 << 30, ingest_items: int = 256,
                 ingest_bytes: int = 256 << 20, background_bytes: int = 256 << 20) -> None:
        self.model = model.digest if isinstance(model, ModelFingerprint) else bytes(model)
        if len(self.model) != 16:
            raise ValueError(f"model: expected a 16-byte fingerprint digest, got {len(self.model)} bytes")
        self.config, self.policy_name = config, policy
        self.stats = StoreStats()
        self._lock = threading.RLock()
        self.memory: list[MemoryTier] = []
        if config.device_bytes:
            self.memory.append(device_tier(config.device_bytes, make_policy(policy), device))
        if config.host_bytes:
            self.memory.append(host_tier(config.host_bytes, make_policy(policy)))
        self.disk = (DiskTier(config.disk_path, config.disk_bytes, self.model, make_policy(policy))
                     if config.disk_path and config.disk_bytes else None)
        self.redis = (RedisTier(config.redis_url, config.redis_bytes, self.model, policy=policy,
                                namespace=redis_namespace) if config.redis_url and config.redis_bytes else None)
        self.tiers = TierStack(self.memory, self.disk, self.redis, self.stats, fit_patch)
        self._disk_writer = (DiskWriter(self._lock, self.tiers, self.stats, self.model, self._held)
                             if self.disk is not None else None)
        self._write_through = (RedisWriteThrough(self.redis, self.model, self.stats, self._lock,
                                                 write_through_pending_bytes)
                               if redis_write_through and self.redis is not None else None)
        self._ingester = Ingester(self, self._lock, self.tiers, self.stats, capture_patches,
                                  offer=lambda item, n: self._bg.offer("ingest", item, n), held=self._held)
        self._work = DeferredWork(self._lock, self.tiers, self.stats, self._ingester, self._disk_writer,
                                  offer=lambda w, n: self._bg.offer("work", w, n))
        self._loader = Loader(self._lock, self.tiers, self.stats, self._held, io_threads)
        self._lookup = Lookup(self._lock, self.tiers, self.stats, self._ingester, self._loader,
                              settle=lambda: self._work.drain(inline=False))
        self._redis_usage: tuple[int, int] = (0, 0)  # Redis' (bytes, entries), as of the last read
        self._usage_read: Future | None = None
        self._bg = Background(self._run_background, ingest_items=ingest_items, ingest_bytes=ingest_bytes,
                              work_items=1 << 16, work_bytes=background_bytes)

    # ---------------------------------------------------------------- ingest
    def ingest(self, key: ChunkKey, token_ids: Tokens, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               context: bytes | str = ISOLATED, *, rope: Any = None, recompute_cost: float = 0.0,
               preceding: Sequence[bytes] = ()) -> bool:
        """Hand over a chunk's KV computed in ``context``; returns at once (False: dropped, queue full).

        k, v: ``[num_layers, num_tokens, num_kv_heads, head_dim]``, owned by the store from now on
        (pass a copy; slices of one copy are fine: the background thread compacts each); positions: ``[num_tokens]`` or ``[3, num_tokens]``, the frame k was rotated
        at; preceding: the last chunk key digests before the chunk, in order (kept as the context's
        ``ChunkEntry.preceding`` and persisted, so a restarted or remote directory can match survival
        and reorder).  In the background: a new key becomes an entry; a stored key gets this
        context's KV, relocated into its frame with ``rope`` (a :class:`~kvreuse.rope.spec.RopeSpec`),
        and its patch.  Until then, a lookup of a new key, or of the stored key in ``context``, is
        served from these very tensors.
        """
        return self.ingest_many([IngestChunk(key, token_ids, positions, k, v, context, preceding, recompute_cost)],
                                rope=rope)[0]

    def ingest_many(self, chunks: Sequence[IngestChunk], *, rope: Any = None) -> list[bool]:
        """:meth:`ingest` of several chunks (one request's) at once: one queue item while they fit the
        ingest queue's bounds together, else each chunk on its own (those that do not fit are dropped
        and counted, as by :meth:`ingest`).  Returns, per chunk, whether it was queued."""
        return self._ingester.submit(chunks, rope)

    def pending_ingest_bytes(self) -> int:
        """Bytes of KV queued or being ingested (bounded by ``ingest_bytes``)."""
        return self._bg.held_bytes("ingest")

    def pending_bytes(self) -> dict[str, int]:
        """Bytes queued or running on the background thread, per lane: ``"ingest"`` (saved chunks not yet
        stored) and ``"work"`` (spills, demoted contexts' patch fits); all 0: everything handed over is done."""
        return {lane: self._bg.held_bytes(lane) for lane in ("ingest", "work")}

    def _kept(self, key: ChunkKey) -> bool:
        """With the lock held: whether a memory tier or the disk holds ``key`` (what a put achieved)."""
        return any(key in t for t in self.memory) or (self.disk is not None and key in self.disk)

    def _held(self, key: ChunkKey) -> bool:
        """With the lock held: whether this store keeps ``key`` locally (memory, on its way to disk, disk)."""
        return (any(key in t for t in self.memory) or key in self.tiers.spilling or key in self._ingester.pending
                or (self.disk is not None and key in self.disk))

    def _run_background(self, item: Any) -> None:
        if isinstance(item, (IngestJob, IngestBatch)):
            for job in item.jobs if isinstance(item, IngestBatch) else (item,):
                self._ingester.run(job)
                self._work.drain()
        else:
            self._work.run(item)
            self._work.drain()

    # ---------------------------------------------------------------- writes
    def put(self, entry: ChunkEntry) -> bool:
        """Store a chunk now (its tensors are adopted or copied onto the tier's device).

        If the key is already in memory, ``entry``'s KV is recorded as in-context KV of the existing
        entry (when its context differs) and its patches are merged.  Returns False when no tier
        can hold it.  Slow work it causes (spills, demotion fits) runs on this thread, outside the
        lock; savers on a critical path call :meth:`ingest` instead.
        """
        t0 = time.perf_counter()
        with self._lock:
            self._put_locked(entry)
            snap = entry.shallow_copy() if self._write_through else None
        self._work.drain()
        with self._lock:
            stored = self._kept(entry.key)
        if snap is not None:
            stored = self._write_through.publish(snap) or stored
        self.stats.put_seconds.observe(time.perf_counter() - t0)
        return stored

    def put_new(self, entry: ChunkEntry) -> bool | None:
        """``put`` for a key this store holds nowhere (the common case of a save): the check and the put
        under one hold of the lock (a save costs the forward's thread the GIL for as long as it runs
        Python).  None when the key is held somewhere, or with a Redis tier: the caller takes the
        general path."""
        if self.redis is not None:
            return None
        t0 = time.perf_counter()
        key = entry.key
        with self._lock:
            if self._kept(key) or key in self.tiers.spilling or key in self._loader.inflight:
                return None
            self._put_locked(entry)
            stored = self._kept(key)
            if stored:
                self.stats.ingested_entries += 1
        if self.tiers.work:
            self._work.drain()
        self.stats.put_seconds.observe(time.perf_counter() - t0)
        return stored

    def _put_locked(self, entry: ChunkEntry) -> None:
        i = next((i for i, t in enumerate(self.memory) if entry.key in t), None)
        if i is not None:
            if self.tiers.merge(i, entry):
                self.republish(entry.key)
            return
        n = entry.nbytes
        stored = self.tiers.place(entry)
        if stored is not None and self.disk is not None:  # write-behind: every stored chunk reaches disk (restart-warm)
            if not self._bg.offer("work", SpillJob(stored.shallow_copy(), copy=True), n):
                self.stats.dropped_write_behind += 1

    def republish(self, key: ChunkKey) -> None:
        """With the lock held: ``key``'s memory entry gained a context; queue it for Redis again (no I/O here)."""
        if self._write_through is None:
            return
        e = next((t.entries[key] for t in self.memory if key in t), None)
        if e is not None:
            self._write_through.publish(e.shallow_copy(), replace=True)

    def add_context_kv(self, key: ChunkKey, context: bytes | str, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Record KV of a stored chunk computed in ``context`` (in the entry's positional frame).

        k, v: ``[num_layers, num_tokens, num_kv_heads, head_dim]``.  False if the chunk is not in
        a memory tier or there is no room.
        """
        with self._lock:
            for i, t in enumerate(self.memory):
                if key in t:
                    base = t.entries[key]
                    new = dataclasses.replace(base, k=k, v=v, context=as_signature(context), in_context={},
                                              patches={})
                    before = t.entries[key].nbytes
                    if self.tiers.merge(i, new):
                        self.republish(key)
                    ok = t.entries[key].nbytes > before or as_signature(context) == base.context
                    break
            else:
                return False
        self._work.drain()
        return ok

    def add_patch(self, key: ChunkKey, context: bytes | str, patch: Any) -> bool:
        """Record a conditioning patch of a stored chunk for ``context``; False if not in memory or no room."""
        with self._lock:
            for i, t in enumerate(self.memory):
                if key in t:
                    e = t.entries[key]
                    if as_signature(context) in e.patches:
                        return True
                    ok = self.tiers.make_room(i, int(patch.nbytes), protect=key)
                    if ok:
                        e.add_patch(context, patch)
                        t.resized(key)
                    break
            else:
                return False
        self._work.drain()
        return ok

    def demote(self, key: ChunkKey | None = None) -> int:
        """Demote ``key`` (or every memory entry): in-context KV → patches (fitted on this thread,
        outside the lock, for contexts without one).  Returns the bytes the KV held."""
        freed = 0
        with self._lock:
            for t in self.memory:
                for k in [key] if key is not None else list(t.entries):
                    if k in t and t.entries[k].demotable:
                        freed += self.tiers.demote(t, k)
        self._work.drain()
        return freed

    def evict(self, key: ChunkKey) -> bool:
        """Move ``key`` out of its memory tier to the next tier down (as pressure would)."""
        with self._lock:
            for i, t in enumerate(self.memory):
                if key in t:
                    e = t.pop(key, evicted=True)
                    self.tiers.count_eviction(t.name, e.nbytes)
                    self.tiers.spill(i + 1, e)
                    break
            else:
                return False
        self._work.drain()
        return True

    def remove(self, key: ChunkKey) -> None:
        """Forget ``key`` in every tier."""
        writing = self._disk_writer.write_lock if self._disk_writer else contextlib.nullcontext()
        with writing, self._lock:  # no disk write of it is under way
            for t in self.memory:
                if key in t:
                    t.pop(key)
            self.tiers.spilling.pop(key, None)
            for kc in [kc for kc in self.tiers.fitting if kc[0] == key]:
                del self.tiers.fitting[kc]
            if self.disk is not None:
                self.disk.remove(key)
        if self.redis is not None:
            self.redis.remove(key)

    # ---------------------------------------------------------------- reads
    def contains(self, key: ChunkKey, token_ids: Tokens | None = None) -> str | None:
        """Name of the fastest tier holding ``key`` (verified against ``token_ids`` if given), or None.

        No side effects: nothing is promoted, touched or counted (safe in the scheduler's hooks).
        """
        return self._lookup.contains(key, token_ids)

    def fetch(self, key: ChunkKey, token_ids: Tokens, *, timeout: float | None = None) -> Rehydration | None:
        """Look ``key`` up; a handle on its entry (complete for a memory hit, loading otherwise), or None.

        ``handle.layer(i)`` returns layer i's base ``(k, v)``, each ``[num_tokens, num_kv_heads,
        head_dim]``, as soon as it has arrived; ``handle.result()`` the whole :class:`ChunkEntry`.
        ``timeout``: the most seconds to wait for Redis to answer (the entry's header); past it, None.
        """
        return self._lookup.fetch(key, token_ids, timeout=timeout)

    def get(self, key: ChunkKey, token_ids: Tokens, *, context: bytes | str | None = None,
            tokens: slice | None = None, layers: slice | None = None, timeout: float | None = None,
            label: str | None = None) -> ChunkView | None:
        """Fetch and wait: the chunk's KV as it reads in ``context`` (partial with ``tokens``/``layers``), or None.

        A failed load is a miss here (counted in ``failed_loads``), and so is one that takes longer
        than ``timeout`` seconds in all (counted in ``load_timeouts``; it completes in the
        background).  The hit is counted under ``label`` (e.g. "reorder") or how it was served
        ("exact", "patched", "base").
        """
        return self._lookup.get(key, token_ids, context=context, tokens=tokens, layers=layers, timeout=timeout,
                                label=label)

    def record_policy(self, label: str) -> None:
        """Count a hit under a reuse policy decided by the caller."""
        with self._lock:
            self._lookup.count_hit(label)

    # ---------------------------------------------------------------- misc
    def flush(self, timeout: float | None = None) -> None:
        """Wait for queued ingests, background work, Redis writes and in-flight loads."""
        self._work.drain()
        self._bg.join(timeout)
        if self._write_through is not None:
            self._write_through.flush(timeout)
        self._loader.wait(timeout)
        self._work.drain()
        self._bg.join(timeout)

    def take_events(self) -> StoreEvents:
        """Keys evicted from this store and keys demoted since the last call (for the scheduler's directory)."""
        if not (self.tiers.lost or self.tiers.demoted):
            # every step calls this: without events it never waits for the lock (the background thread may
            # hold it); a key appended meanwhile is taken at the next call
            return StoreEvents([], [])
        with self._lock:
            out = StoreEvents(list(self.tiers.lost), list(self.tiers.demoted))
            self.tiers.lost.clear()
            self.tiers.demoted.clear()
        return out

    def snapshot_stats(self, blocking: bool = True) -> StoreStats | None:
        """A copy of the stats with the tier gauges (bytes, budgets, entries) filled in; Redis' come from
        the last background read that finished (each call starts the next one).  ``blocking=False``:
        None when another thread holds the store's lock (a caller between two engine steps)."""
        if not self._lock.acquire(blocking=blocking):
            return None
        try:
            s = self.stats.copy()
            for t in self.memory:
                ts = s.tier(t.name)
                ts.used_bytes, ts.budget_bytes, ts.entries = t.used_bytes, t.budget_bytes, len(t)
            if self.disk is not None:
                ts = s.tier("disk")
                ts.used_bytes, ts.budget_bytes, ts.entries = self.disk.used_bytes, self.disk.budget_bytes, len(self.disk)
                ts.dropped_corrupt = self.disk.dropped_corrupt
            usage = self._read_redis_usage() if self.redis is not None else None
        finally:
            self._lock.release()
        if self.redis is not None:
            ts = s.tier("redis")
            ts.used_bytes, ts.entries = usage
            ts.budget_bytes = self.redis.budget_bytes
            ts.errors, ts.evictions = self.redis.errors, ts.evictions + self.redis.evictions
            ts.dropped_corrupt = self.redis.dropped_corrupt
        return s

    def _read_redis_usage(self) -> tuple[int, int]:
        """With the lock held: Redis' (bytes, entries) as of the last read, and the next read started on
        an I/O thread, so reading stats (a worker does it between steps) never waits on the network."""
        f = self._usage_read
        if f is None or f.done():
            if f is not None and f.result() is not None:
                self._redis_usage = f.result()
            self._usage_read = self._loader.submit(self.redis.usage)
        return self._redis_usage

    def close(self) -> None:
        """Finish pending work and release the disk directory and the Redis connection."""
        self.flush()
        self._bg.close()
        self._loader.close()
        if self._write_through is not None:
            self._write_through.close()
        if self.disk is not None:
            self.disk.close()
        if self.redis is not None:
            self.redis.close()

    def __enter__(self) -> "ChunkStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
