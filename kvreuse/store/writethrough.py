"""Redis write-through: every stored entry is published to the shared tier on one writer thread.

An entry that gains a context after its first publish is published again (``replace``), so the
shared copy and its index record — what other instances' directories read — list that context
too; replaces of one key waiting together are one write of the newest snapshot.  Bounded by the
bytes of entries waiting to be written (a publish beyond it is refused and counted); the network
I/O never runs under the store's lock.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

from kvreuse.store.entry import ChunkEntry
from kvreuse.store.keys import ChunkKey
from kvreuse.store.persist import encode
from kvreuse.store.stats import StoreStats
from kvreuse.store.tiers import RedisTier
from kvreuse.store.tiers.redis import MAX_VALUE_BYTES
from kvreuse.threads import enter_background


class RedisWriteThrough:
    """Publishes entries to ``redis``; ``lock`` is the store's (it guards ``stats``)."""

    def __init__(self, redis: RedisTier, model: bytes, stats: StoreStats, lock: threading.RLock,
                 pending_limit: int) -> None:
        self.redis, self.model, self.stats, self.lock = redis, model, stats, lock
        self.pending_limit, self.pending_bytes = pending_limit, 0
        self._futures: set[Future] = set()
        self._replacing: dict[ChunkKey, ChunkEntry] = {}  # newest snapshot of each key whose replace waits
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="kvreuse-redis", initializer=enter_background)

    def publish(self, e: ChunkEntry, *, replace: bool = False) -> bool:
        """Queue ``e`` (a :meth:`ChunkEntry.shallow_copy` taken under the lock); False if refused.

        ``replace``: write it even where Redis holds the key already (``e`` has contexts the
        published copy lacks); a replace of ``e.key`` still waiting takes ``e`` instead of a second write.
        """
        n = e.nbytes
        with self.lock:
            waiting = self._replacing.get(e.key) if replace else None
            held = waiting.nbytes if waiting is not None else 0
            if n > min(self.redis.budget_bytes, MAX_VALUE_BYTES) or self.pending_bytes - held + n > self.pending_limit:
                self.stats.tier("redis").rejected_puts += 1
                return False
            self.pending_bytes += n - held
            if waiting is not None:
                self._replacing[e.key] = e
                return True
            if replace:
                self._replacing[e.key] = e
                fut = self._writer.submit(self._replace, e.key)
            else:
                fut = self._writer.submit(self._put, e, n)
            self._futures.add(fut)
        fut.add_done_callback(self._futures.discard)
        return True

    def _replace(self, key: ChunkKey) -> None:
        with self.lock:
            e = self._replacing.pop(key)
        self._put(e, e.nbytes, replace=True)

    def _put(self, e: ChunkEntry, n: int, replace: bool = False) -> None:
        try:
            if not replace and self.redis.contains(e.key):
                return
            blob = encode(e, self.model)
            ok = self.redis.put_blob(e.key, blob, cost=e.recompute_cost, hits=e.hits)
            with self.lock:
                ts = self.stats.tier("redis")
                if ok:
                    ts.puts, ts.bytes_written = ts.puts + 1, ts.bytes_written + len(blob)
                else:
                    ts.rejected_puts += 1
        finally:
            with self.lock:
                self.pending_bytes -= n

    def flush(self, timeout: float | None = None) -> None:
        for f in list(self._futures):
            f.result(timeout)

    def close(self) -> None:
        self._writer.shutdown(wait=True)
