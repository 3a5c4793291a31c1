"""Loading an entry from a lower tier (disk, Redis) into memory, layer by layer, shared by every lookup of its key.

:class:`Rehydration` is the handle a lookup gets: ``layer(i)`` returns as soon as layer i has
arrived, ``result()`` once the whole entry has.  :class:`Loader` runs the loads of one store on its
I/O threads: one load per key however many lookups ask for it (``inflight``), room reserved up front
in the fastest memory tier that can take the entry, and the loaded entry inserted there.  A failed
load (corrupt, evicted meanwhile, unreachable) fails the handle; a corrupt copy is dropped.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Protocol

import numpy as np
import torch
import xxhash

from kvreuse.errors import KVReuseError
from kvreuse.store.entry import ChunkEntry
from kvreuse.store.keys import ChunkKey
from kvreuse.store.persist import EntryCorrupt, EntryHeader, Segment, assemble, dtype_named, segment_tensor
from kvreuse.store.placement import TierStack
from kvreuse.store.stats import StoreStats
from kvreuse.threads import enter_background


class ChunkLoadError(KVReuseError):
    """A hit could not be loaded (corrupt, evicted meanwhile, or unreachable); report it and recompute."""


class BlobReader(Protocol):
    header: EntryHeader

    def read(self, offset: int, n: int) -> bytes: ...

    def close(self) -> None: ...


class Rehydration:
    """Handle on an entry being loaded; ``layer(i)`` blocks only until layer i has arrived.

    ``token_ids`` and ``positions`` are known at once (from the header).  A failed load raises
    :class:`ChunkLoadError` from ``layer`` and ``result``; the store has already dropped the bad copy.
    """

    def __init__(self, key: Any, source: str, num_layers: int, token_ids: torch.Tensor,
                 positions: torch.Tensor) -> None:
        self.key, self.source, self.num_layers = key, source, num_layers
        self.token_ids, self.positions = token_ids, positions
        self._cv = threading.Condition()
        self._layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self._entry: ChunkEntry | None = None
        self._error: BaseException | None = None

    @classmethod
    def completed(cls, entry: ChunkEntry, source: str) -> "Rehydration":
        """A handle on an entry already in memory (nothing to load)."""
        h = cls(entry.key, source, entry.num_layers, entry.token_ids, entry.positions)
        h._entry = entry  # no waiter can exist yet: no need to notify
        return h

    def done(self) -> bool:
        return self._entry is not None or self._error is not None

    def _wait(self, pred: Callable[[], bool], timeout: float | None) -> None:
        with self._cv:
            if not self._cv.wait_for(lambda: pred() or self._error is not None, timeout):
                raise TimeoutError(f"{self.key}: still loading from {self.source}")
            if self._error is not None:
                raise ChunkLoadError(f"{self.key}: load from {self.source} failed: {self._error}") from self._error

    def layer(self, i: int, timeout: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Base K and V of layer ``i``: each ``[num_tokens, num_kv_heads, head_dim]``."""
        if not 0 <= i < self.num_layers:
            raise IndexError(f"layer {i} of {self.num_layers}")
        if self._entry is not None:
            return self._entry.k[i], self._entry.v[i]
        self._wait(lambda: self._entry is not None or self._layers[i] is not None, timeout)
        if self._entry is not None:
            return self._entry.k[i], self._entry.v[i]
        kv = self._layers[i]
        assert kv is not None
        return kv

    def result(self, timeout: float | None = None) -> ChunkEntry:
        """The whole entry once loaded."""
        self._wait(lambda: self._entry is not None, timeout)
        assert self._entry is not None
        return self._entry

    # ---------------------------------------------------------------- the loader's side
    def set_layer(self, i: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Layer ``i`` has arrived (each ``[num_tokens, num_kv_heads, head_dim]``): wake its waiters."""
        with self._cv:
            self._layers[i] = (k, v)
            self._cv.notify_all()

    def finish(self, entry: ChunkEntry | None, error: BaseException | None = None) -> None:
        """The load is over: ``entry`` loaded, or ``error`` (then ``layer`` and ``result`` raise :class:`ChunkLoadError`)."""
        with self._cv:
            self._entry, self._error = entry, error
            self._layers = [None] * self.num_layers
            self._cv.notify_all()


def _read_into(reader: BlobReader, seg: Segment, dst: torch.Tensor) -> None:
    """Read one segment, verify its checksum, copy its bytes into ``dst`` (contiguous, same dtype/shape)."""
    if tuple(dst.shape) != seg.shape or dst.dtype != dtype_named(seg.dtype):
        raise EntryCorrupt(f"segment {seg.name}: shape/dtype disagree with the header")
    offset = reader.header.payload_offset + seg.offset
    u8 = dst.reshape(-1).view(torch.uint8)
    direct = getattr(reader, "read_into", None)
    if direct is not None and dst.device.type == "cpu":
        out = u8.numpy()
        direct(offset, memoryview(out))  # straight into the destination; verified in place before use
        if xxhash.xxh3_64_intdigest(out) != seg.checksum:
            raise EntryCorrupt(f"segment {seg.name}: checksum mismatch")
        return
    arr = np.frombuffer(reader.read(offset, seg.nbytes), dtype=np.uint8)
    if xxhash.xxh3_64_intdigest(arr) != seg.checksum:
        raise EntryCorrupt(f"segment {seg.name}: checksum mismatch")
    if dst.device.type == "cpu":
        u8.numpy()[:] = arr
    else:
        u8.copy_(torch.from_numpy(arr.copy()), non_blocking=False)


def load_layers(handle: Rehydration, reader: BlobReader, *, device: torch.device, pin: bool,
                patch_from_state_dict: Callable[[dict[str, torch.Tensor]], Any] | None) -> ChunkEntry:
    """Load base K/V layer by layer into preallocated tensors (publishing each layer), then the rest."""
    h = reader.header
    dt = dtype_named(h.dtype)
    pin = pin and torch.cuda.is_available() and device.type == "cpu"
    k = torch.empty(h.shape, dtype=dt, device=device, pin_memory=pin)
    v = torch.empty(h.shape, dtype=dt, device=device, pin_memory=pin)
    for i in range(h.num_layers):
        _read_into(reader, h.segments[f"k.{i}"], k[i])
        _read_into(reader, h.segments[f"v.{i}"], v[i])
        handle.set_layer(i, k[i], v[i])
    rest = {}
    for name, seg in h.segments.items():
        if name.startswith(("ctx.", "patch.")):
            raw = reader.read(h.payload_offset + seg.offset, seg.nbytes)
            t = segment_tensor(h, seg, raw, pin=pin)
            rest[name] = t.to(device) if name.startswith("ctx.") else t
    return assemble(h, rest, patch_from_state_dict, k=k, v=v)


def _patch_loader() -> Callable[[dict[str, torch.Tensor]], Any] | None:
    try:
        from kvreuse.patch import Patch
    except ImportError:
        return None
    return Patch.from_state_dict


class Loader:
    """The loads of one store from its disk and Redis tiers, on ``io_threads`` threads.

    ``lock`` is the store's: it guards ``inflight``, the tiers and ``stats``.  ``held(key)``, called
    with it held: whether the store still keeps ``key`` anywhere (else a failed load reports it lost).
    """

    def __init__(self, lock: threading.RLock, tiers: TierStack, stats: StoreStats,
                 held: Callable[[ChunkKey], bool], io_threads: int) -> None:
        self.lock, self.tiers, self.stats, self.held = lock, tiers, stats, held
        self.inflight: dict[ChunkKey, Rehydration] = {}  # one load per key, shared by its lookups
        self._pool = ThreadPoolExecutor(io_threads, thread_name_prefix="kvreuse-load", initializer=enter_background)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run ``fn(*args)`` on an I/O thread (network reads that no caller may wait on)."""
        return self._pool.submit(fn, *args)

    def open_remote(self, key: ChunkKey, timeout: float | None) -> BlobReader | None:
        """Redis' reader of ``key``; with a ``timeout``, opened on an I/O thread and waited for that long
        (a stalled Redis holds that thread until its own socket timeout, never the caller; past it: None,
        counted in ``load_timeouts``)."""
        redis = self.tiers.redis
        assert redis is not None
        if timeout is None:
            return redis.open(key)
        fut = self._pool.submit(redis.open, key)
        try:
            return fut.result(timeout)
        except TimeoutError:
            with self.lock:
                self.stats.load_timeouts += 1
            return None

    def start(self, key: ChunkKey, reader: BlobReader, source: str, t0: float) -> Rehydration:
        """With the lock held, ``reader``'s header verified by the caller: count the hit, reserve room in the
        fastest memory tier that can take the entry, start the load; its handle."""
        hd, memory = reader.header, self.tiers.memory
        self.stats.tier(source).hits += 1
        h = Rehydration(key, source, hd.num_layers, hd.token_ids, hd.positions)
        need = hd.payload_bytes + 8 * (hd.token_ids.numel() + hd.positions.numel())  # >= the entry's nbytes
        dest = next((i for i, t in enumerate(memory) if need <= t.budget_bytes - sum(t.reserved.values())
                     and self.tiers.make_room(i, need)), None)
        if dest is not None:
            memory[dest].reserve(key, need)
        self.inflight[key] = h
        self._pool.submit(self._load, h, reader, dest, t0)
        return h

    def _load(self, h: Rehydration, reader: BlobReader, dest: int | None, t0: float) -> None:
        entry, err = None, None
        memory, disk, redis = self.tiers.memory, self.tiers.disk, self.tiers.redis
        try:
            t = memory[dest] if dest is not None else None
            entry = load_layers(h, reader, device=t.device if t else torch.device("cpu"),
                                pin=bool(t and t.pin), patch_from_state_dict=_patch_loader())
            entry.touch()
        except Exception as e:  # corrupt, evicted meanwhile, unreachable: the load fails, the store goes on
            err = e
        finally:
            reader.close()
        with self.lock:
            self.inflight.pop(h.key, None)
            if dest is not None:
                t = memory[dest]
                if entry is not None and not any(h.key in m for m in memory):
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
                if isinstance(err, (EntryCorrupt, ChunkLoadError)) and h.source == "disk" and disk:
                    disk.drop(h.key)
                if not self.held(h.key):
                    self.tiers.lost.append(h.key)
        if err is not None and isinstance(err, EntryCorrupt) and h.source == "redis" and redis:
            redis.drop_corrupt(h.key, reader.version)  # only if no other writer replaced it meanwhile
        if err is None and h.source == "redis" and redis:
            redis.touch(h.key, nbytes=reader.header.total_bytes, cost=entry.recompute_cost, hits=entry.hits)
        h.finish(entry, err)

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the loads under way (failed ones included)."""
        for h in list(self.inflight.values()):
            try:
                h.result(timeout)
            except ChunkLoadError:
                pass

    def close(self) -> None:
        self._pool.shutdown(wait=True)
