"""The chunk store: content-addressed entries across device, host, disk and Redis tiers.

Placement.  A new entry goes to the fastest memory tier it fits in.  Memory tiers are exclusive
(an entry lives in one of them); disk and Redis may hold copies.  Redis is written through
(asynchronously, on a writer thread) so the other stores of a deployment see new chunks at once.

Pressure.  Before an insert, the target tier makes room: first it *demotes* entries that hold
full in-context KV (lowest priority first: that KV becomes a patch fitted on in-context − base),
then it *evicts* by the tier's policy (see :mod:`kvreuse.store.policy`), spilling each victim to
the next tier down (device → host → disk → Redis).  Every tier's budget is checked on insert
and never exceeded; bytes of an entry still being loaded are reserved up front.

Lookups.  A memory hit is served at once (and a host hit promoted to the device tier).  A disk or
Redis hit returns a :class:`~kvreuse.store.rehydrate.Rehydration` filled layer by layer on an
I/O thread into the fastest memory tier; concurrent lookups of a key share it.  Every hit is
verified against the stored token ids; a mismatch, a corrupt copy or an unreachable Redis is a
miss (counted), never an error.

Thread safety: all public methods may be called from any thread; metadata is guarded by one lock,
held during demotion and disk spills but not during loads or Redis writes.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Sequence

import torch

from kvreuse.store.config import StoreConfig
from kvreuse.store.entry import ChunkEntry, ChunkView, as_signature
from kvreuse.store.keys import ChunkKey, ModelFingerprint, token_bytes
from kvreuse.store.persist import EntryCorrupt, encode
from kvreuse.store.placement import _AUTO, TierStack
from kvreuse.store.policy import make_policy
from kvreuse.store.rehydrate import ChunkLoadError, Rehydration, load_layers
from kvreuse.store.stats import StoreStats
from kvreuse.store.tiers import DiskTier, MemoryTier, RedisTier, device_tier, host_tier
from kvreuse.store.tiers.redis import MAX_VALUE_BYTES

Tokens = Sequence[int] | torch.Tensor


class ChunkStore:
    """Chunk KV entries under per-tier byte budgets.

    Args:
        config: tier budgets and locations.
        model: the model fingerprint (``ModelFingerprint`` or its 16-byte digest); entries of any
            other fingerprint are never served.
        policy: eviction policy of every tier, ``"cost"`` (GDSF, default) or ``"lru"``.
        fit_patch: ``fit(delta_k, delta_v, *, base_k, base_v, dtype) -> Patch`` used by demotion;
            default ``kvreuse.fit_patch``; ``None`` drops in-context KV instead.
        device: device of the device tier (default: the current CUDA device, else CPU).
        redis_write_through: publish every put to Redis (default True).
    """

    def __init__(self, config: StoreConfig, model: bytes | ModelFingerprint, *, policy: str = "cost",
                 fit_patch: Any = _AUTO, device: torch.device | str | None = None, io_threads: int = 2,
                 redis_namespace: str = "kvreuse:", redis_write_through: bool = True,
                 write_through_pending_bytes: int = 1 << 30) -> None:
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
        self._write_through = redis_write_through and self.redis is not None
        self._pending_limit, self._pending_bytes = write_through_pending_bytes, 0
        self._pending: set[Future] = set()
        self._inflight: dict[ChunkKey, Rehydration] = {}
        self._loads = ThreadPoolExecutor(io_threads, thread_name_prefix="kvreuse-load")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="kvreuse-redis") if self._write_through else None

    # ---------------------------------------------------------------- writes
    def put(self, entry: ChunkEntry) -> bool:
        """Store a chunk (its tensors are adopted or copied onto the tier's device).

        If the key is already in memory, ``entry``'s KV is recorded as in-context KV of the existing
        entry (when its context differs) and its patches are merged.  Returns False when no tier
        can hold it.
        """
        t0 = time.perf_counter()
        with self._lock:
            stored = self._put_locked(entry)
            snap = self._snapshot(entry) if self._write_through else None
        if snap is not None:
            stored = self._publish(snap) or stored
        self.stats.put_seconds.observe(time.perf_counter() - t0)
        return stored

    def _put_locked(self, entry: ChunkEntry) -> bool:
        for i, t in enumerate(self.memory):
            if entry.key in t:
                self._merge_into(i, entry)
                return True
        n = entry.nbytes
        for i, t in enumerate(self.memory):
            if n <= t.budget_bytes and self.tiers.make_room(i, n):
                t.insert(t.adopt(entry))
                ts = self.stats.tier(t.name)
                ts.puts, ts.bytes_written = ts.puts + 1, ts.bytes_written + n
                return True
            self.stats.tier(t.name).rejected_puts += 1
        return self.disk is not None and self.tiers.disk_put(entry)

    def _merge_into(self, i: int, new: ChunkEntry) -> None:
        t, e = self.memory[i], self.memory[i].entries[new.key]
        add_ctx = {c: kv for c, kv in new.in_context.items() if c != e.context and c not in e.in_context}
        if new.context != e.context and new.context not in e.in_context:
            add_ctx[new.context] = (new.k, new.v)
        add_patch = {c: p for c, p in new.patches.items() if c not in e.patches}
        grow = sum(a.numel() * a.element_size() * 2 for a, _ in add_ctx.values())
        grow += sum(int(p.nbytes) for p in add_patch.values())
        if not grow or not self.tiers.make_room(i, grow, protect=new.key):
            return
        for c, (k, v) in add_ctx.items():
            e.add_context_kv(c, k, v)
        for c, p in add_patch.items():
            e.add_patch(c, p)
        t.resized(new.key)

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
                    self._merge_into(i, new)
                    return t.entries[key].nbytes > before or as_signature(context) == base.context
        return False

    def add_patch(self, key: ChunkKey, context: bytes | str, patch: Any) -> bool:
        """Record a conditioning patch of a stored chunk for ``context``; False if not in memory or no room."""
        with self._lock:
            for i, t in enumerate(self.memory):
                if key in t:
                    e = t.entries[key]
                    if as_signature(context) in e.patches:
                        return True
                    if not self.tiers.make_room(i, int(patch.nbytes), protect=key):
                        return False
                    e.add_patch(context, patch)
                    t.resized(key)
                    return True
        return False

    def demote(self, key: ChunkKey | None = None) -> int:
        """Demote ``key`` (or every memory entry): in-context KV → patches.  Returns bytes freed."""
        freed = 0
        with self._lock:
            for t in self.memory:
                for k in [key] if key is not None else list(t.entries):
                    if k in t and t.entries[k].demotable:
                        freed += self.tiers.demote(t, k)
        return freed

    def evict(self, key: ChunkKey) -> bool:
        """Move ``key`` out of its memory tier to the next tier down (as pressure would)."""
        with self._lock:
            for i, t in enumerate(self.memory):
                if key in t:
                    e = t.pop(key, evicted=True)
                    self.tiers.count_eviction(t.name, e.nbytes)
                    self.tiers.spill(i + 1, e)
                    return True
        return False

    def remove(self, key: ChunkKey) -> None:
        """Forget ``key`` in every tier."""
        with self._lock:
            for t in self.memory:
                if key in t:
                    t.pop(key)
            if self.disk is not None:
                self.disk.remove(key)
        if self.redis is not None:
            self.redis.remove(key)

    # ---------------------------------------------------------------- reads
    def contains(self, key: ChunkKey, token_ids: Tokens | None = None) -> str | None:
        """Name of the fastest tier holding ``key`` (verified against ``token_ids`` if given), or None.

        No side effects: nothing is promoted, touched or counted (safe in the scheduler's hooks).
        """
        tok = None if token_ids is None else token_bytes(token_ids)
        ok = lambda stored: tok is None or token_bytes(stored) == tok  # noqa: E731
        with self._lock:
            for t in self.memory:
                if key in t:
                    return t.name if ok(t.entries[key].token_ids) else None
            h = self._inflight.get(key)
            if h is not None:
                return h.source if ok(h.token_ids) else None
            if self.disk is not None and key in self.disk:
                return "disk" if ok(self.disk.index[key].token_ids) else None
        if self.redis is not None:
            r = self.redis.open(key)
            if r is not None:
                r.close()
                return "redis" if ok(r.header.token_ids) else None
        return None

    def fetch(self, key: ChunkKey, token_ids: Tokens) -> Rehydration | None:
        """Look ``key`` up; a handle on its entry (complete for a memory hit, loading otherwise), or None.

        ``handle.layer(i)`` returns layer i's base ``(k, v)``, each ``[num_tokens, num_kv_heads,
        head_dim]``, as soon as it has arrived; ``handle.result()`` the whole :class:`ChunkEntry`.
        """
        t0 = time.perf_counter()
        try:
            return self._fetch(key, token_bytes(token_ids), t0)
        finally:
            self.stats.lookup_seconds.observe(time.perf_counter() - t0)

    def _fetch(self, key: ChunkKey, tok: bytes, t0: float) -> Rehydration | None:
        with self._lock:
            self.stats.lookups += 1
            for i, t in enumerate(self.memory):
                e = t.entries.get(key)
                if e is None:
                    self.stats.tier(t.name).misses += 1
                    continue
                if token_bytes(e.token_ids) != tok:
                    return self._mismatch()
                e.touch()
                t.touched(key)
                self.stats.tier(t.name).hits += 1
                return Rehydration.completed(self.tiers.promote(i, e) if i else e, t.name)
            h = self._inflight.get(key)
            if h is not None:
                if token_bytes(h.token_ids) != tok:
                    return self._mismatch()
                self.stats.shared_rehydrations += 1
                return h
            if self.disk is not None:
                reader = self.disk.open(key)
                if reader is not None:
                    return self._start_load(key, tok, reader, "disk", t0)
                self.stats.tier("disk").misses += 1
        reader = self.redis.open(key) if self.redis is not None else None  # network: outside the lock
        if reader is None:
            if self.redis is not None:
                self.stats.tier("redis").misses += 1
            self.stats.misses += 1
            return None
        with self._lock:
            h = self._inflight.get(key)  # another lookup started it while we were away
            if h is not None:
                reader.close()
                if token_bytes(h.token_ids) != tok:
                    return self._mismatch()
                self.stats.shared_rehydrations += 1
                return h
            return self._start_load(key, tok, reader, "redis", t0)

    def _start_load(self, key: ChunkKey, tok: bytes, reader: Any, source: str, t0: float) -> Rehydration | None:
        """With the lock held: verify, reserve room in the fastest memory tier that can take it, start the load."""
        hd = reader.header
        if token_bytes(hd.token_ids) != tok:
            reader.close()
            return self._mismatch()
        self.stats.tier(source).hits += 1
        h = Rehydration(key, source, hd.num_layers, hd.token_ids, hd.positions)
        need = hd.payload_bytes + 8 * (hd.token_ids.numel() + hd.positions.numel())  # >= the entry's nbytes
        dest = next((i for i, t in enumerate(self.memory) if need <= t.budget_bytes - sum(t.reserved.values())
                     and self.tiers.make_room(i, need)), None)
        if dest is not None:
            self.memory[dest].reserve(key, need)
        self._inflight[key] = h
        self._loads.submit(self._rehydrate, h, reader, dest, t0)
        return h

    def _rehydrate(self, h: Rehydration, reader: Any, dest: int | None, t0: float) -> None:
        entry, err = None, None
        try:
            t = self.memory[dest] if dest is not None else None
            entry = load_layers(h, reader, device=t.device if t else torch.device("cpu"),
                                pin=bool(t and t.pin), patch_from_state_dict=self._patch_loader())
            entry.touch()
        except Exception as e:  # corrupt, evicted meanwhile, unreachable: the load fails, the store goes on
            err = e
        finally:
            reader.close()
        with self._lock:
            self._inflight.pop(h.key, None)
            if dest is not None:
                t = self.memory[dest]
                if entry is not None and not any(h.key in m for m in self.memory):
                    t.insert(entry)
                else:
                    t.release(h.key)
            if err is None:
                self.stats.rehydrations += 1
                self.stats.bytes_moved += reader.header.payload_bytes
                self.stats.tier(h.source).bytes_read += reader.header.total_bytes
                self.stats.rehydrate_seconds.observe(time.perf_counter() - t0)
            else:
                self.stats.failed_loads += 1
                if isinstance(err, (EntryCorrupt, ChunkLoadError)) and h.source == "disk" and self.disk:
                    self.disk.drop(h.key)
        if err is not None and isinstance(err, EntryCorrupt) and h.source == "redis" and self.redis:
            self.redis.remove(h.key)
        if err is None and h.source == "redis" and self.redis:
            self.redis.touch(h.key, nbytes=reader.header.total_bytes, cost=entry.recompute_cost, hits=entry.hits)
        h._finish(entry, err)

    def get(self, key: ChunkKey, token_ids: Tokens, *, context: bytes | str | None = None,
            tokens: slice | None = None, layers: slice | None = None, timeout: float | None = None,
            label: str | None = None) -> ChunkView | None:
        """Fetch and wait: the chunk's KV as it reads in ``context`` (partial with ``tokens``/``layers``), or None.

        A failed load is a miss here (counted in ``failed_loads``).  The hit is counted under
        ``label`` (e.g. "reorder") or how it was served ("exact", "patched", "base").
        """
        h = self.fetch(key, token_ids)
        if h is None:
            return None
        try:
            e = h.result(timeout)
        except ChunkLoadError:
            return None
        with self._lock:
            view = e.view(context, tokens=tokens, layers=layers)
            name = label or view.how
            self.stats.hits_by_policy[name] = self.stats.hits_by_policy.get(name, 0) + 1
        return view

    def record_policy(self, label: str) -> None:
        """Count a hit under a reuse policy decided by the caller."""
        with self._lock:
            self.stats.hits_by_policy[label] = self.stats.hits_by_policy.get(label, 0) + 1

    def _mismatch(self) -> None:
        self.stats.token_mismatches += 1
        self.stats.misses += 1
        return None

    # ---------------------------------------------------------------- Redis write-through
    def _snapshot(self, e: ChunkEntry) -> ChunkEntry:
        return dataclasses.replace(e, in_context=dict(e.in_context), patches=dict(e.patches))

    def _publish(self, e: ChunkEntry) -> bool:
        n = e.nbytes
        with self._lock:
            if n > min(self.redis.budget_bytes, MAX_VALUE_BYTES) or self._pending_bytes + n > self._pending_limit:
                self.stats.tier("redis").rejected_puts += 1
                return False
            self._pending_bytes += n
            fut = self._writer.submit(self._redis_put, e, n)
            self._pending.add(fut)
        fut.add_done_callback(self._pending.discard)
        return True

    def _redis_put(self, e: ChunkEntry, n: int) -> None:
        try:
            if self.redis.contains(e.key):
                return
            blob = encode(e, self.model)
            ok = self.redis.put_blob(e.key, blob, cost=e.recompute_cost, hits=e.hits)
            with self._lock:
                ts = self.stats.tier("redis")
                if ok:
                    ts.puts, ts.bytes_written = ts.puts + 1, ts.bytes_written + len(blob)
                else:
                    ts.rejected_puts += 1
        finally:
            with self._lock:
                self._pending_bytes -= n

    # ---------------------------------------------------------------- misc
    @staticmethod
    def _patch_loader() -> Any:
        try:
            from kvreuse.patch import Patch
        except ImportError:
            return None
        return Patch.from_state_dict

    def flush(self, timeout: float | None = None) -> None:
        """Wait for queued Redis writes and in-flight loads."""
        for f in list(self._pending):
            f.result(timeout)
        for h in list(self._inflight.values()):
            try:
                h.result(timeout)
            except ChunkLoadError:
                pass

    def snapshot_stats(self) -> StoreStats:
        """A copy of the stats with the tier gauges (bytes, budgets, entries) filled in."""
        with self._lock:
            s = self.stats.copy()
            for t in self.memory:
                ts = s.tier(t.name)
                ts.used_bytes, ts.budget_bytes, ts.entries = t.used_bytes, t.budget_bytes, len(t)
            if self.disk is not None:
                ts = s.tier("disk")
                ts.used_bytes, ts.budget_bytes, ts.entries = self.disk.used_bytes, self.disk.budget_bytes, len(self.disk)
                ts.dropped_corrupt = self.disk.dropped_corrupt
        if self.redis is not None:
            ts = s.tier("redis")
            ts.used_bytes, ts.budget_bytes = self.redis.used_bytes() or 0, self.redis.budget_bytes
            ts.errors, ts.evictions = self.redis.errors, ts.evictions + self.redis.evictions
        return s

    def close(self) -> None:
        """Finish pending work and release the disk directory and the Redis connection."""
        self.flush()
        self._loads.shutdown(wait=True)
        if self._writer is not None:
            self._writer.shutdown(wait=True)
        if self.disk is not None:
            self.disk.close()
        if self.redis is not None:
            self.redis.close()

    def __enter__(self) -> "ChunkStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
