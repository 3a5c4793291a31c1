"""Writing entries to the disk tier without holding the store's lock through an fsync.

A write is three steps (:meth:`DiskTier.reserve`, :meth:`DiskTier.write_file`,
:meth:`DiskTier.commit`): the store's lock is held to reserve the bytes (choosing disk victims)
and to index the file, never to plan, write or fsync it, nor to copy a disk victim to Redis.
Writes run one at a time (``write_lock``, which lookups never take).

Two kinds of write: an entry evicted from memory, readable meanwhile from ``tiers.spilling``
until its file is indexed; and a write-behind ``copy`` of an entry kept in memory.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from kvreuse.store.entry import ChunkEntry
from kvreuse.store.keys import ChunkKey
from kvreuse.store.persist import EntryCorrupt, plan
from kvreuse.store.placement import TierStack
from kvreuse.store.stats import StoreStats

log = logging.getLogger("kvreuse.store")


class DiskWriter:
    """Writes entries to ``tiers.disk``; ``lock`` is the store's, ``held(key)`` whether the store still keeps key."""

    def __init__(self, lock: threading.RLock, tiers: TierStack, stats: StoreStats, model: bytes,
                 held: Callable[[ChunkKey], bool]) -> None:
        assert tiers.disk is not None
        self.lock, self.tiers, self.stats, self.model, self.held = lock, tiers, stats, model, held
        self.disk, self.redis = tiers.disk, tiers.redis
        self.write_lock = threading.Lock()

    def write(self, e: ChunkEntry, *, copy: bool = False) -> None:
        """Write ``e`` (evicted, or a ``copy`` of one kept in memory) durably and index it."""
        with self.write_lock:
            with self.lock:
                if copy:
                    if e.key in self.disk or not any(e.key in t for t in self.tiers.memory):
                        return  # on disk already, or left memory (its eviction spills it)
                elif self.tiers.spilling.get(e.key) is not e:
                    return  # removed, or a newer copy is on its way
            head, bufs = plan(e, self.model)
            n = len(head) + sum(b.nbytes for b in bufs)
            with self.lock:
                victims = self.disk.reserve(e.key, n)
                if victims is None:
                    self.stats.tier("disk").rejected_puts += 1
                    self.abandon(e)
                    return
                for vk, vh, _ in victims:
                    self.tiers.count_eviction("disk", vh.total_bytes)
                    if self.redis is None and not self.held(vk):
                        self.tiers.lost.append(vk)
            for vk, vh, reader in victims:  # disk victims go to Redis (network), then their files go
                try:
                    if reader is not None and self.redis is not None and not self.redis.contains(vk):
                        self.redis.put_blob(vk, reader.read(0, vh.total_bytes), cost=vh.recompute_cost,
                                            hits=vh.hits)
                except (OSError, EntryCorrupt):
                    pass
                finally:
                    if reader is not None:
                        reader.close()
                self.disk.unlink(vk)
            try:
                self.disk.write_file(e.key, head, bufs)
            except OSError as err:
                log.warning("kvreuse: writing chunk %s to disk failed: %s", e.key.hex()[:12], err)
                with self.lock:
                    self.disk.unreserve(n)
                    self.stats.tier("disk").errors += 1
                    self.abandon(e)
                return
            with self.lock:
                self.disk.commit(head, e.key)
                ts = self.stats.tier("disk")
                ts.puts, ts.bytes_written = ts.puts + 1, ts.bytes_written + n
                self.stats.bytes_moved += e.nbytes
                if self.tiers.spilling.get(e.key) is e:
                    del self.tiers.spilling[e.key]

    def abandon(self, e: ChunkEntry) -> None:
        """With the lock held: ``e`` will not reach disk; if the store no longer keeps it, it is lost."""
        if self.tiers.spilling.get(e.key) is e:
            del self.tiers.spilling[e.key]
        if not self.held(e.key):
            self.tiers.lost.append(e.key)
