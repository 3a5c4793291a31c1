"""The store's background thread and its two bounded queues.

Everything slow the store does — fitting a patch (an SVD), writing an entry to disk (an fsync),
copying a disk victim to Redis (network) — runs here, never on a caller's thread and never under
the store's lock (the store takes its lock only to look up and to publish).  Two lanes feed one
thread:

* ``work``: maintenance the store owes, served first: patches of demoted contexts, spills to disk.
* ``ingest``: chunks handed to :meth:`ChunkStore.ingest`.

Each lane is bounded by items and by bytes; an item's bytes count from the offer until its run
ends, so the memory held here never exceeds the bounds.  An offer to a full lane returns False at
once (the caller counts the drop): callers never wait for this thread.

Where the thread shares the engine's cores it runs at a lower CPU priority (``nice``, Linux: per
thread, inherited by the threads it starts, e.g. an SVD's OpenMP team) so that the forward pass wins
them; moved to CPUs of its own (``kvreuse.threads``) it keeps the process' priority.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any, Callable

from kvreuse.threads import enter_background

log = logging.getLogger("kvreuse.store")


class _Lane:
    def __init__(self, max_items: int, max_bytes: int) -> None:
        if max_items < 1 or max_bytes < 0:
            raise ValueError(f"a lane needs max_items >= 1 and max_bytes >= 0, got {max_items}, {max_bytes}")
        self.max_items, self.max_bytes = max_items, max_bytes
        self.items: deque[tuple[Any, int]] = deque()
        self.held_items = self.held_bytes = 0  # queued + running

    def fits(self, nbytes: int) -> bool:
        return self.held_items < self.max_items and self.held_bytes + nbytes <= self.max_bytes


class Background:
    """One daemon thread draining a ``work`` lane (first) and an ``ingest`` lane through ``run(item)``."""

    def __init__(self, run: Callable[[Any], None], *, ingest_items: int, ingest_bytes: int, work_items: int,
                 work_bytes: int, name: str = "kvreuse-store", nice: int = 10) -> None:
        self._run, self._nice = run, nice
        self._lanes = {"work": _Lane(work_items, work_bytes), "ingest": _Lane(ingest_items, ingest_bytes)}
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def offer(self, lane: str, item: Any, nbytes: int) -> bool:
        """Queue ``item`` (holding ``nbytes`` until it has run); False when the lane is full or closed."""
        ln = self._lanes[lane]
        with self._cv:
            if self._closed or not ln.fits(nbytes):
                return False
            ln.items.append((item, nbytes))
            ln.held_items += 1
            ln.held_bytes += nbytes
            self._cv.notify_all()
        return True

    def held_bytes(self, lane: str) -> int:
        """Bytes of ``lane``'s queued and running items."""
        with self._cv:
            return self._lanes[lane].held_bytes

    def _next(self) -> tuple[_Lane, Any, int] | None:
        with self._cv:
            while True:
                for ln in self._lanes.values():
                    if ln.items:
                        item, n = ln.items.popleft()
                        return ln, item, n
                if self._closed:
                    return None
                self._cv.wait()

    def _loop(self) -> None:
        enter_background(self._nice)  # off the forward's cores (kvreuse.threads), or at a lower priority
        while True:
            nxt = self._next()
            if nxt is None:
                return
            ln, item, n = nxt
            try:
                self._run(item)
            except Exception:  # the store's handlers count their own failures; this is the last guard
                log.exception("kvreuse: background store task failed")
            finally:
                with self._cv:
                    ln.held_items -= 1
                    ln.held_bytes -= n
                    self._cv.notify_all()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until both lanes are empty and nothing runs; False on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: all(ln.held_items == 0 for ln in self._lanes.values()), timeout)

    def close(self) -> None:
        """Run what is queued, then stop the thread."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join()
