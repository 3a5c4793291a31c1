"""Chunks stored by *other* vLLM instances, seen through the shared Redis tier (scheduler side).

The scheduler's `Directory` knows the chunks its own worker saved.  With a Redis tier configured,
a chunk missing there is looked up in a *local* index of the shared tier: a background thread
copies the tier's index records (`RedisTier.index_records`: key, token count, context signatures
and their last preceding keys — never a payload) every `refresh_seconds`, and only when the
tier's change counter moved.  A lookup is a dict read, so the scheduler thread never waits on the
network, and a Redis outage costs nothing but misses.

Bounds: at most `max_entries` records are kept (the rest are misses); records are trusted for
`ttl_seconds` after the last successful refresh, after which every lookup misses until Redis
answers again (an index that cannot be refreshed would claim chunks that may be gone).  The
thread sleeps at least nine times the CPU time a refresh took, so it never takes more than a
tenth of the scheduler process's interpreter.

With tensor (or pipeline) parallelism each rank stores its own KV under its own fingerprint;
a chunk is listed only when every rank's fingerprint holds it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Sequence

from kvreuse.store.persist import IndexRecord
from kvreuse.store.tiers.redis import RedisTier

log = logging.getLogger("kvreuse.connector")


class RemoteLookup:
    """`lookup(digest) -> (num_tokens, context signatures) | None`: a local read of the shared tier's index.

    Args:
        url, budget_bytes, namespace: the shared tier, as the workers' stores configure it.
        model_digests: the fingerprint digest of every rank (rank 0 first), or one digest.
        refresh_seconds: period of the background refresh.
        ttl_seconds: how long records stay valid without a successful refresh.
        max_entries: most records kept.
        start: run the background thread (tests may call `refresh` themselves instead).
    """

    def __init__(self, url: str, budget_bytes: int, model_digests: bytes | Sequence[bytes],
                 namespace: str = "kvreuse:", *, refresh_seconds: float = 1.0, ttl_seconds: float = 30.0,
                 max_entries: int = 200_000, start: bool = True) -> None:
        self.digests = [model_digests] if isinstance(model_digests, bytes) else list(model_digests)
        assert self.digests, "model_digests: need at least one fingerprint"
        self.refresh_seconds, self.ttl_seconds, self.max_entries = refresh_seconds, ttl_seconds, max_entries
        self._url, self._budget, self._ns = url, budget_bytes, namespace
        self.tier: RedisTier | None = None
        self._records: dict[bytes, bytes] = {}  # key digest -> packed IndexRecord (unpacked on lookup)
        self._fresh_until = 0.0
        self._version: int | None = None
        self.refreshes = self.failed_refreshes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvreuse-remote-index", daemon=True)
        if start:
            self._thread.start()

    # ---------------------------------------------------------------- scheduler thread: local reads only
    def record(self, digest: bytes) -> IndexRecord | None:
        """The shared tier's record of chunk `digest`, as of the last refresh (None: absent or stale)."""
        if not self.fresh:
            return None
        b = self._records.get(digest)
        return None if b is None else IndexRecord.unpack(b)

    def lookup(self, digest: bytes) -> tuple[int, tuple[bytes, ...]] | None:
        r = self.record(digest)
        return None if r is None else (r.num_tokens, r.contexts)

    def __len__(self) -> int:
        return len(self._records)

    @property
    def fresh(self) -> bool:
        """Whether the last successful refresh is recent enough (within the TTL) to be trusted."""
        return time.monotonic() <= self._fresh_until

    # ---------------------------------------------------------------- background
    def _connect(self) -> RedisTier:
        if self.tier is None:  # cluster detection reads the server: done here, never on the caller's thread
            self.tier = RedisTier(self._url, self._budget, self.digests[0], namespace=self._ns)
        return self.tier

    def refresh(self) -> bool:
        """Copy the shared tier's index now; False when Redis could not be read (old records stay until their TTL)."""
        tier = self._connect()
        ver = tier.index_version()
        if ver is None:
            self.failed_refreshes += 1
            return False
        if ver != self._version or not self._records:
            recs = tier.index_records(self.digests[0], self.max_entries)
            for other in self.digests[1:]:
                if recs is None:
                    break
                theirs = tier.index_records(other, self.max_entries)
                recs = None if theirs is None else {k: v for k, v in recs.items() if k in theirs}
            if recs is None:
                self.failed_refreshes += 1
                return False
            self._records, self._version = recs, ver  # one reference swap: readers see old or new
        self._fresh_until = time.monotonic() + self.ttl_seconds
        self.refreshes += 1
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            cpu0 = time.thread_time()
            try:
                self.refresh()
            except Exception:  # never let the index thread die; a failed refresh is only staleness
                log.exception("kvreuse: refreshing the shared tier's index failed")
            # A large, busy index takes long to copy: wait 9x the CPU time that took (not the wall time,
            # which waiting on Redis or on a busy host inflates), so this thread holds the interpreter
            # (the scheduler's) at most a tenth of the time.
            self._stop.wait(max(self.refresh_seconds, 9 * (time.thread_time() - cpu0)))

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        if self.tier is not None:
            self.tier.close()
