"""What a saved chunk becomes: the store's ingest path, run on its background thread.

:meth:`ChunkStore.ingest` hands the chunk to :meth:`Ingester.submit`, which registers it
(``pending``: until it is stored, lookups of a new key, and of a stored key in the chunk's context,
are served from these bytes) and queues it on the store's bounded ingest lane; a full lane drops it
(counted, and reported lost when the store keeps the key nowhere else).  :meth:`Ingester.run` then
decides:

* a key the store does not hold becomes a new entry (``ChunkStore.put``);
* a stored key computed in another context: its KV is kept as computed, in its own positional
  frame (``ChunkEntry.frames``: an exact claim reads it unrotated), and added to the entry if the
  memory tier can make room.  Its patch (fitted on in-context − base in the entry's frame,
  ``kvreuse.ops.relocate``) is fitted here with ``capture_patches`` (then added first, as it is the
  smaller); without, when the KV finds no room or the store is demoting (memory pressure: that KV is
  soon demoted too), and otherwise when demotion drops that KV (``placement.FitJob``): a patch is
  read only in place of its context's KV, so a fit while the KV is held is work for nothing;
* a context the entry already holds is a no-op.

Fits (SVDs) and any disk or Redis reads run outside the store's lock; the lock is taken to look
up and to publish.  Demotion's patch fits use :meth:`Ingester.fit` and :meth:`publish_context` too.
What the ingester asks of its store is :class:`IngestTarget`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Protocol, Sequence

import torch

from kvreuse.store.entry import ChunkEntry, as_signature
from kvreuse.store.keys import ChunkKey, token_bytes
from kvreuse.store.placement import TierStack
from kvreuse.store.ready import ReadyAfter
from kvreuse.store.rehydrate import ChunkLoadError, Rehydration
from kvreuse.store.stats import StoreStats

log = logging.getLogger("kvreuse.store")

PRESSURE_WINDOW = 64  # new contexts over which a demotion means memory pressure (patches then fitted at ingest)


@dataclass
class IngestJob:
    """A chunk handed to :meth:`ChunkStore.ingest`; ``entry`` holds the KV as copied out (its own frame)."""

    entry: ChunkEntry
    rope: Any
    ready: ReadyAfter | None = None  # the KV's producer stream (kvreuse.store.ready): waited for before any read

    @property
    def nbytes(self) -> int:
        return self.entry.k.numel() * self.entry.k.element_size() * 2


@dataclass
class IngestBatch:
    """Chunks handed over together (one request's new chunks): one queue item, one wake-up of the store's
    thread, run one after the other."""

    jobs: list[IngestJob]


class IngestChunk(NamedTuple):
    """One chunk of :meth:`ChunkStore.ingest_many` (the arguments of :meth:`ChunkStore.ingest`)."""

    key: ChunkKey
    token_ids: Any
    positions: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    context: bytes | str
    preceding: Sequence[bytes] = ()
    recompute_cost: float = 0.0
    ready: ReadyAfter | None = None  # k, v still being written on a CUDA stream (ReadyAfter.record), or None


class IngestTarget(Protocol):
    """What the ingest path asks of its store (:class:`~kvreuse.store.store.ChunkStore`'s methods of these names)."""

    def put_new(self, entry: ChunkEntry) -> bool | None: ...

    def put(self, entry: ChunkEntry) -> bool: ...

    def contains(self, key: ChunkKey, token_ids: Any = None) -> str | None: ...

    def fetch(self, key: ChunkKey, token_ids: Any, *, timeout: float | None = None) -> Rehydration | None: ...

    def republish(self, key: ChunkKey) -> None: ...


class Ingester:
    """The ingest decisions of one store.

    ``lock`` is the store's (it guards ``pending``, the tiers and ``stats``); ``offer(item, nbytes)``
    queues on the store's ingest lane (False: full); ``held(key)``, called with the lock held: whether
    the store keeps ``key`` locally.
    """

    def __init__(self, store: IngestTarget, lock: threading.RLock, tiers: TierStack, stats: StoreStats,
                 capture_patches: bool, offer: Callable[[Any, int], bool], held: Callable[[ChunkKey], bool]) -> None:
        self.store, self.lock, self.tiers, self.stats = store, lock, tiers, stats
        self.capture_patches, self.offer, self.held = capture_patches, offer, held
        self._demotion_marks: deque[int] = deque(maxlen=PRESSURE_WINDOW)  # `stats.demotions` at recent new contexts
        self.pending: dict[ChunkKey, list[IngestJob]] = {}  # queued or running, oldest first

    def submit(self, chunks: Sequence[IngestChunk], rope: Any) -> list[bool]:
        """Queue ``chunks`` (one request's): one item while they fit the lane together, else each on its own
        (those that do not fit alone are dropped, counted, and reported lost).  Per chunk: queued."""
        jobs = []
        for c in chunks:
            ctx = as_signature(c.context)
            jobs.append(IngestJob(ChunkEntry(key=c.key, token_ids=c.token_ids, positions=c.positions, k=c.k, v=c.v,
                                             context=ctx, recompute_cost=c.recompute_cost,
                                             preceding={ctx: tuple(bytes(d) for d in c.preceding)} if c.preceding
                                             else {}), rope, c.ready))
        if not jobs:
            return []
        with self.lock:
            for job in jobs:
                self.register(job)
        sizes = [job.nbytes for job in jobs]
        if self.offer(IngestBatch(jobs) if len(jobs) > 1 else jobs[0], sum(sizes)):
            with self.lock:
                self.stats.ingests += len(jobs)
            return [True] * len(jobs)
        ok = [False] * len(jobs) if len(jobs) == 1 else [self.offer(job, n) for job, n in zip(jobs, sizes)]
        with self.lock:
            for job, queued in zip(jobs, ok):
                if queued:
                    self.stats.ingests += 1
                    continue
                self.unregister(job)
                self.stats.dropped_ingests += 1
                if not self.held(job.entry.key):
                    self.tiers.lost.append(job.entry.key)
        return ok

    def pending_entry(self, key: ChunkKey, context: bytes | None = None) -> ChunkEntry | None:
        """With the lock held: the KV of a chunk still queued for ingest, as copied out (the latest
        handed over; with ``context``, the latest computed in that context)."""
        for job in reversed(self.pending.get(key, ())):
            if context is None or job.entry.context == context:
                return job.entry
        return None

    def register(self, job: IngestJob) -> None:
        """With the lock held: ``job`` is pending."""
        self.pending.setdefault(job.entry.key, []).append(job)

    def unregister(self, job: IngestJob) -> None:
        """With the lock held: ``job`` is done (or was dropped)."""
        jobs = [j for j in self.pending.get(job.entry.key, ()) if j is not job]
        if jobs:
            self.pending[job.entry.key] = jobs
        else:
            self.pending.pop(job.entry.key, None)

    def run(self, job: IngestJob) -> None:
        """Store ``job``'s chunk: a new entry, or a stored chunk's new context (see the module doc).

        A failure is logged and counted: a failed save is a future miss, never a failed request."""
        try:
            self._run(job)
        except Exception:
            log.exception("kvreuse: ingesting chunk %s failed", job.entry.key.hex()[:12])
            with self.lock:
                self.stats.failed_ingests += 1
        with self.lock:
            if not self.held(job.entry.key) and self.tiers.redis is None:
                self.tiers.lost.append(job.entry.key)

    def _run(self, job: IngestJob) -> None:
        t0 = time.perf_counter()
        e = job.entry
        if job.ready is not None:  # gathered on the forward's stream: this thread's stream waits for it first
            job.ready.wait(e.k, e.v)
        if not (e.k.is_contiguous() and e.v.is_contiguous()):  # a slice of the saving step's buffer: own its bytes
            e.k, e.v = e.k.contiguous(), e.v.contiguous()
        try:
            self._ingest(job)
        finally:
            with self.lock:
                self.unregister(job)
                self.stats.ingest_seconds.observe(time.perf_counter() - t0)

    def _ingest(self, job: IngestJob) -> None:
        e = job.entry
        if self.store.put_new(e) is not None:  # a key stored nowhere yet: the fast path
            return
        with self.lock:
            base = next((t.entries[e.key] for t in self.tiers.memory if e.key in t), None)
        if base is None and self.store.contains(e.key) not in (None, "ingest"):
            h = self.store.fetch(e.key, e.token_ids)  # disk or Redis I/O: this thread, outside the lock
            try:
                base = h.result(60.0) if h is not None else None
            except (ChunkLoadError, TimeoutError):
                base = None
        if base is None:
            if self.store.put(e):
                with self.lock:
                    self.stats.ingested_entries += 1
            return
        if token_bytes(base.token_ids) != token_bytes(e.token_ids):
            with self.lock:
                self.stats.token_mismatches += 1
            return
        if base.has_context(e.context):
            return
        k, v = e.k.to(base.k.device), e.v.to(base.k.device)  # kept in its own frame (`ChunkEntry.frames`)
        if job.rope is not None and self.tiers.rope is None:
            with self.lock:
                self.tiers.rope = job.rope  # for demotion's fits of contexts kept in their own frame
        frame = None if torch.equal(e.positions, base.positions) else e.positions
        fittable = frame is None or job.rope is not None  # a patch is fitted in the entry's frame: `rope` moves k there
        if self.capture_patches and not fittable:
            raise ValueError("ingest: a chunk at other positions than its stored entry needs `rope`")
        eager = self.capture_patches or (self._under_pressure() and fittable)
        patch = self.fit(k, v, base, frame, job.rope) if eager else None
        with self.lock:
            kept = self.publish_context(e.key, e.context, base, (k, v), patch, e.preceding.get(e.context),
                                        e.positions)
        if kept is False and patch is None and fittable:
            # fitted when demoted, as a rule; its KV found no room: the patch, smaller, is all that can be kept
            patch = self.fit(k, v, base, frame, job.rope)
            if patch is not None:
                with self.lock:
                    self.publish_context(e.key, e.context, base, None, patch, e.preceding.get(e.context))

    def _under_pressure(self) -> bool:
        """Whether the store demoted anything over the last `PRESSURE_WINDOW` new contexts: then a new context's KV
        is soon demoted too, and its patch is fitted at once (the same fit, without the demotion's burst of them)."""
        with self.lock:
            now = self.stats.demotions
        recent = now - self._demotion_marks[0] if self._demotion_marks else now
        self._demotion_marks.append(now)
        return recent > 0

    def fit(self, k: torch.Tensor, v: torch.Tensor, base: ChunkEntry, positions: torch.Tensor | None = None,
            rope: Any = None) -> Any:
        """A patch for in-context ``k, v`` (``[L, N, H, D]``, computed at ``positions``; None: the base's) over
        ``base``, fitted in the base's frame (``rope`` relocates them there), or None (no fit, or it failed)."""
        fit = self.tiers.fit_fn()
        if fit is None:
            return None
        if positions is not None:
            from kvreuse.ops import relocate

            k = relocate(k, positions, base.positions, rope)
        try:  # deltas in fp32: the residue is small next to K and V, so a bf16 subtraction would lose it
            return fit(k.float() - base.k.float(), v.float() - base.v.float(), base_k=base.k, base_v=base.v,
                       dtype=base.k.dtype)
        except (RuntimeError, ValueError):  # e.g. non-finite KV: the context reads as base KV
            with self.lock:
                self.stats.failed_fits += 1
            return None

    def publish_context(self, key: ChunkKey, ctx: bytes, base: ChunkEntry,
                        kv: tuple[torch.Tensor, torch.Tensor] | None, patch: Any,
                        preceding: tuple[bytes, ...] | None = None,
                        positions: torch.Tensor | None = None) -> bool | None:
        """With the lock held: add a context's patch, then its KV, to ``key``'s memory entry if room allows;
        whether that entry then holds the context (its KV or its patch), None where it was skipped.

        ``base`` is the entry both were computed against; skipped when that entry left memory or
        was replaced by one with another base meanwhile.  ``preceding``: the context's preceding
        chunk keys, recorded with it once the entry holds its KV or patch.
        """
        for i, t in enumerate(self.tiers.memory):
            cur = t.entries.get(key)
            if cur is None:
                continue
            if cur.context != base.context or not torch.equal(cur.positions, base.positions):
                return None
            held = (cur.has_context(ctx), ctx in cur.in_context)
            if patch is not None and ctx not in cur.patches and self.tiers.make_room(i, int(patch.nbytes), key):
                cur.add_patch(ctx, patch)
                t.resized(key)
                self.stats.captured_patches += 1
            if kv is not None and ctx not in cur.in_context:
                n = cur.context_nbytes(*kv, positions)
                if self.tiers.make_room(i, n, protect=key):
                    cur.add_context_kv(ctx, *kv, positions)
                    t.resized(key)
                    self.stats.ingested_contexts += 1
            if preceding and cur.has_context(ctx):
                cur.preceding.setdefault(ctx, preceding)
            if kv is not None and (cur.has_context(ctx), ctx in cur.in_context) != held:
                # computed in this context here: the shared copy learns it (a demotion's refit does not)
                self.store.republish(key)
            return cur.has_context(ctx)
        return None
