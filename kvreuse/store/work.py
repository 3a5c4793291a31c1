"""The slow work the tiers defer while the store's lock is held, run once it is released.

Making room queues :class:`~kvreuse.store.placement.FitJob` (the patch of a demoted context) and
:class:`~kvreuse.store.placement.SpillJob` (an evicted entry's way to disk) in ``tiers.work``.
:meth:`DeferredWork.drain` takes them out after the lock is released and either runs them on the
calling thread (the background thread, and the synchronous ``put``, ``demote``, ``evict``) or
queues them on the background lane (a lookup: it never waits for them).  A job the full lane
refuses is dropped and counted: a dropped spill loses the entry, a dropped fit leaves the context
to read as base KV.
"""

from __future__ import annotations

import threading
from typing import Callable

from kvreuse.store.ingest import Ingester
from kvreuse.store.placement import FitJob, SpillJob, TierStack
from kvreuse.store.spill import DiskWriter
from kvreuse.store.stats import StoreStats


class DeferredWork:
    """Runs ``tiers.work``.  ``lock`` is the store's; ``offer(job, nbytes)`` queues a job on the background
    lane (False: full); ``disk_writer`` is None without a disk tier (then no spill is ever queued)."""

    def __init__(self, lock: threading.RLock, tiers: TierStack, stats: StoreStats, ingester: Ingester,
                 disk_writer: DiskWriter | None, offer: Callable[[FitJob | SpillJob, int], bool]) -> None:
        self.lock, self.tiers, self.stats = lock, tiers, stats
        self.ingester, self.disk_writer, self.offer = ingester, disk_writer, offer

    def run(self, w: FitJob | SpillJob) -> None:
        """Run one job on this thread, outside the lock."""
        if isinstance(w, FitJob):
            patch = None
            try:
                patch = self.ingester.fit(w.k, w.v, w.base, w.positions, self.tiers.rope)
            finally:  # one step: the context is served from its KV until then, from its patch from then on
                with self.lock:
                    if patch is not None:
                        self.ingester.publish_context(w.key, w.context, w.base, None, patch)
                    self.tiers.fitted(w)
        else:
            self.disk_writer.write(w.entry, copy=w.copy)

    def drain(self, inline: bool = True) -> None:
        """Run (``inline``, until none is left) or queue the jobs the tiers deferred."""
        while True:
            with self.lock:
                work, self.tiers.work = self.tiers.work, []
            if not work:
                return
            for w in work:
                if inline:
                    self.run(w)
                elif not self.offer(w, w.nbytes):
                    with self.lock:
                        if isinstance(w, SpillJob):
                            self.stats.dropped_spills += 1
                            if not w.copy:
                                self.disk_writer.abandon(w.entry)
                        else:
                            self.stats.dropped_fits += 1
                            self.tiers.fitted(w)
            if not inline:
                return
