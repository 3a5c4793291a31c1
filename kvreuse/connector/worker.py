"""Worker side: place claimed chunks into the paged KV cache layer by layer; save new chunks.

Load: `start_load` fetches each claimed chunk's view from the store (KV as it reads in the chosen
recorded context, in the entry's positional frame); `load_layer` then relocates layer i's keys to
the request's positions and scatters K and V into the layer's paged cache through the slot
mapping.  A chunk that cannot be fetched fails the rest of its request's claim: those blocks are
reported through `failed_block_ids` and vLLM recomputes them.  A step waits at most
`load_timeout_seconds` in all for chunks from slow tiers (Redis, disk); one not there by then
fails the same way (counted in `load_timeouts`), so a stalled tier never holds up a step.

Loads wait for nothing but their own bytes: a chunk still being ingested is served from the
bytes already copied out (see `ChunkStore.fetch`).  What is counted is what is served: a claim
the store can only serve from base KV counts as "blind".  A claim served as another policy than
planned is refused (recomputed) when it was exact (vLLM caches it under plain block hashes) or when
the request's fidelity does not accept what the store holds (`kvreuse.connector.fidelity`).

Save: after the step that computed a request's prompt, each new chunk's K/V is gathered out of
the paged cache (a copy: the blocks may be reused once the request ends) and handed to
`ChunkStore.ingest`, which queues it and returns at once; the store decides what it is (a new
entry, or a stored chunk in a new context: relocated into the entry's frame, patch fitted) on
its own thread.  A request with a failed load in a step saves nothing that step (what it
computed attended to blocks never written); it is reported as unsaved and saved after the
recompute.  Keys the store evicted or demoted are reported to the scheduler's directory.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from kvreuse.connector.config import ConnectorConfig
from kvreuse.connector.fidelity import allows
from kvreuse.connector.metadata import KVReuseMetadata, KVReuseWorkerReport, ReqLoad, ReqSave
from kvreuse.connector.mrope import chunk_shift
from kvreuse.connector.placing import CacheWriter, Job, Placers
from kvreuse.connector.stats import ReuseStats
from kvreuse.errors import KVReuseError
from kvreuse.layout import PagedLayout, Reading, from_vllm_view
from kvreuse.ops import gather
from kvreuse.paged import block_slots
from kvreuse.patch import fit_patch
from kvreuse.rope.spec import RopeSpec
from kvreuse.store import ChunkKey, ChunkStore, ModelFingerprint
from kvreuse.store.ingest import IngestChunk
from kvreuse.store.ready import ReadyAfter
from kvreuse.threads import enter_background

log = logging.getLogger("kvreuse.connector")
_STORE_SNAPSHOT_PERIOD_S = 1.0  # the store's gauges and counters are read at most this often
_MAX_COPIES_IN_FLIGHT = 8  # copy-outs queued on the copy thread before a save waits for them
_COPY_GATE_S = 0.05  # a copy-out starts with the next step, or this long after its save when none comes




def layer_index(name: str) -> int:
    """Index of a decoder layer from vLLM's layer name (`model.layers.3.self_attn.attn` -> 3)."""
    m = re.search(r"\.(\d+)\.", name) or re.search(r"(\d+)", name)
    if m is None:
        raise KVReuseError(f"cannot find a layer index in attention layer name {name!r}")
    return int(m.group(1))


def served_policy(claimed: str, how: str) -> str:
    """The policy a load actually serves, from the claim's and how the store read the chunk.

    `how` is the store's view ("exact", "patched", "base"): base KV in the claimed context is
    "blind" whatever the claim said; a patch read for an exact or survival claim is "recall".
    """
    if how == "base":
        return "blind"
    if how == "patched" and claimed in ("exact", "survival"):
        return "recall"
    return claimed


def detect_layout(kv_cache: torch.Tensor, backend_name: str | None, num_kv_heads: int, head_size: int, *,
                  block_size: int | None = None, kv_cache_dtype: str | None = "auto",
                  kv_layout: str | None = None) -> PagedLayout:
    """The layout of a layer's vLLM 0.32 cache view `[B, H, N, C]` as its backend reads it.

    Refuses (KVReuseError naming the backend and the KV dtype) an unknown backend or a quantized cache.
    """
    return from_vllm_view(kv_cache, backend_name, num_kv_heads=num_kv_heads, head_size=head_size,
                          block_size=block_size, kv_cache_dtype=kv_cache_dtype, kv_layout=kv_layout)


class WorkerSide:
    def __init__(self, cfg: ConnectorConfig, rope: RopeSpec, fingerprint: ModelFingerprint, *,
                 store: ChunkStore | None = None) -> None:
        """`store`: the chunk store to use (default: one built from `cfg.store` and `cfg.policy`)."""
        self.cfg, self.rope = cfg, rope
        self.tp_rank, self.tp_size = fingerprint.tp_rank, fingerprint.tp_size
        pol = cfg.policy  # patches are fitted with the operator's settings, at ingest and under pressure
        # a server at fidelity "exact" never serves a patch (base + patch is approximate): none is fitted, and
        # demotion drops a context's KV (its in-context KV, kept while room allows, serves exact claims)
        patches = pol.fidelity != "exact" and pol.patch_max_rank > 0
        fit = functools.partial(fit_patch, energy=pol.patch_energy, max_rank=pol.patch_max_rank,
                                budget=pol.patch_budget) if patches else None
        self.store = store if store is not None else ChunkStore(cfg.store, fingerprint, fit_patch=fit,
                                                                capture_patches=patches and pol.capture_patches
                                                                and pol.patch_fit == "ingest")
        self.layers: dict[str, int] = {}
        self.caches: dict[str, torch.Tensor] = {}
        self.spec: PagedLayout | None = None
        self._lock = threading.Lock()
        self._stats = ReuseStats()
        self._last_store = None
        self._last_store_t = float("-inf")
        self._jobs: list[Job] = []
        self._layers_done: set[str] = set()
        self._failed_blocks: set[int] = set()
        self._failed_reqs: set[str] = set()  # requests with a failed load in this step: nothing of theirs is saved
        self._unsaved: list[str] = []
        self._lost: list[bytes] = []
        self._failed_loads: list[str] = []  # requests whose load failed (counted by the scheduler, once over ranks)
        self._load_t = 0.0
        self._copier = ThreadPoolExecutor(1, thread_name_prefix="kvreuse-copy", initializer=enter_background)  # save(wait=False)
        self._copying: list[tuple[Future, frozenset[int], frozenset[bytes]]] = []  # copy-outs in flight, in
        # order, with the blocks they read and the chunk keys they save
        self._gate = threading.Condition()  # a copy-out waits for the next step to start (`_open_gate`)
        self._steps = 0
        self._load_obs = (0.0, 0)  # (seconds, tokens) placed since the last report: the scheduler's cost model

    # ---------------------------------------------------------------- setup
    def register(self, kv_caches: dict[str, torch.Tensor], backend_name: str | None, num_kv_heads: int,
                 head_size: int, *, layouts: dict[str, PagedLayout] | None = None, block_size: int | None = None,
                 kv_cache_dtype: str | None = "auto", kv_layout: str | None = None,
                 writers: dict[str, CacheWriter] | None = None) -> None:
        """Take vLLM's per-layer cache views; refuse (at startup) any kvreuse cannot address.

        layouts: each layer's layout as derived from vLLM's KVCacheConfig (`kvreuse.layout`); without
        it, every view is read as `backend_name`'s with the scheduler's `block_size`.
        writers: per layer, vLLM's own cache write (`writer(k, v, cache, slots)`, `[T, H, D]` in the
        cache's dtype), used for the CPU backend's AMX-tiled page, where it is one call a layer and
        kvreuse's indexed writes are many; the connector checks it against kvreuse's reading at startup.
        """
        if layouts is None:
            layouts = {n: detect_layout(c, backend_name, num_kv_heads, head_size, block_size=block_size,
                                        kv_cache_dtype=kv_cache_dtype, kv_layout=kv_layout)
                       for n, c in kv_caches.items()}
        first = next(iter(layouts.values()))
        groups = sorted({lay.group for lay in layouts.values()})
        if len(groups) > 1:
            raise KVReuseError(f"kvreuse places KV through one block table, but this model's attention layers are in "
                               f"{len(groups)} KV cache groups {groups} (backend {first.backend!r}, KV dtype "
                               f"{first.dtype}); serve it without the hybrid KV cache manager")
        odd = [n for n, lay in layouts.items() if lay != first]
        if odd:
            raise KVReuseError(f"layer {odd[0]!r} has cache layout {layouts[odd[0]]}, unlike {first}")
        self.caches = dict(kv_caches)
        # used on the AMX page only, for every layer or none (a load's slots are in scheduler blocks,
        # vLLM's write takes them in kernel blocks: the two must be the same)
        writers = writers or {}
        self.writers = dict(writers) if (first.reading is Reading.CPU_ATTN_AMX and set(writers) >= set(kv_caches)
                                         and first.kernel_block_size == first.block_size) else {}
        self.layers = {n: layer_index(n) for n in kv_caches}
        if sorted(self.layers.values()) != list(range(len(self.layers))):
            # hybrid/odd models: fall back to registration order
            self.layers = {n: i for i, n in enumerate(kv_caches)}
        self.spec = first
        self._placers = Placers(self.rope, first, bool(self.writers))
        log.info("kvreuse: %d layers, backend %s (%s, KV cache layout %s), block size %d (kernel blocks of %d), %s",
                 len(self.layers), first.backend, first.reading.value, first.kv_layout or "?", first.block_size,
                 first.kernel_block_size, first.dtype)

    # ---------------------------------------------------------------- load
    def start_load(self, meta: KVReuseMetadata) -> None:
        """Fetch every claimed chunk of this step (layers are placed in `load_layer`)."""
        # a copy reading blocks this step allocates is waited for at the step's start already (a caller outside
        # vLLM may not have done so); one still copying a chunk this step loads is waited for here: its own bytes
        self.settle_saves(meta.fresh_blocks, {it.key for req in meta.loads for it in req.items})
        if not meta.loads and not self._jobs and not self._layers_done and not self._failed_reqs:
            return  # a step without loads (every decode step): nothing to reset
        self._jobs, self._layers_done, self._failed_reqs = [], set(), set()
        t0 = time.perf_counter()
        deadline = time.monotonic() + self.cfg.load_timeout_seconds
        for req in meta.loads:
            job = self._fetch(req, deadline)
            if job is not None:
                self._jobs.append(job)
        self._load_t = time.perf_counter() - t0 if meta.loads else 0.0

    def _fetch(self, req: ReqLoad, deadline: float) -> Job | None:
        """Views of the request's chunks, each bound for the slots of its own `dst_start`.

        Waits for nothing but the chunks' own bytes, and for those until `deadline` (monotonic).
        The first chunk that cannot be served — a miss, a load past the deadline, M-RoPE positions
        that are not one shift, or KV other than the claim's where provenance forbids it — fails the request's load from
        there on (vLLM recomputes those blocks).
        """
        assert self.spec is not None
        ks, vs, src, dst, slots = [], [], [], [], []
        bs = self.spec.block_size
        held = block_slots(req.block_ids, bs, 0, min(req.end, len(req.block_ids) * bs))  # sliced per chunk
        for n, item in enumerate(req.items):
            view = None
            if not (req.inject_failure and n == 0):
                view = self.store.get(ChunkKey(item.key), list(item.token_ids), context=item.context,
                                      tokens=slice(item.src_start, item.src_end),
                                      timeout=max(deadline - time.monotonic(), 0.0))
            if view is None:
                self._fail(req, item.dst_start, item.key)
                break
            policy = served_policy(item.policy, view.how)
            if not allows(req.fidelity, policy) or (item.policy == "exact" and policy != "exact"):
                # an exact claim is cached by vLLM under plain block hashes: only exact KV may fill it (the
                # context's KV was demoted, its save dropped, overwritten in Redis, or a TP rank lacks it)
                log.info("kvreuse: chunk %s: claimed %s, the store holds only %s KV; recomputed",
                         item.key.hex()[:12], item.policy, policy)
                self._fail(req, item.dst_start, item.key)
                break
            ntok = item.src_end - item.src_start
            src_pos = self._frame(view.positions)
            dst_pos = self._frame(torch.tensor(item.dst_pos, dtype=torch.int64) if item.dst_pos is not None
                                  else torch.arange(item.dst_start, item.dst_start + ntok))
            if src_pos.dim() == 2 and chunk_shift(src_pos, dst_pos) is None:
                # not one offset on all axes: the chunk's inner layout differs (DESIGN: never serve approximate KV)
                log.warning("kvreuse: chunk %s: stored and requested M-RoPE positions differ by more than one "
                            "shift; recomputed", item.key.hex()[:12])
                self._fail(req, item.dst_start, item.key)
                break
            ks.append(view.k)
            vs.append(view.v)
            src.append(src_pos)
            dst.append(dst_pos)
            if item.dst_start + ntok > held.numel():
                raise ValueError(f"tokens up to {item.dst_start + ntok} need {-(-(item.dst_start + ntok) // bs)} "
                                 f"blocks, request {req.req_id} has {len(req.block_ids)}")
            slots.append(held[item.dst_start:item.dst_start + ntok])
            with self._lock:
                self._stats.claims[policy] = self._stats.claims.get(policy, 0) + 1
                self._stats.reused_tokens += ntok
                nb = 2 * view.k.numel() * view.k.element_size()
                self._stats.bytes_loaded[view.source] = self._stats.bytes_loaded.get(view.source, 0) + nb
        if not ks:
            return None
        return Job(ks, vs, torch.cat(src, dim=-1), torch.cat(dst, dim=-1), torch.cat(slots))

    def _frame(self, pos: torch.Tensor) -> torch.Tensor:
        """Positions in the rope's frame: M-RoPE wants `[3, n]` (text at index positions: one row, thrice)."""
        if self.rope.mrope_section is not None and pos.dim() == 1:
            return pos.expand(3, -1).clone()
        return pos

    def _fail(self, req: ReqLoad, first_bad: int, key: bytes) -> None:
        assert self.spec is not None
        bs = self.spec.block_size
        blocks = req.block_ids[first_bad // bs: -(-req.end // bs)]
        with self._lock:
            self._failed_blocks.update(blocks)
            self._failed_reqs.add(req.req_id)
            self._failed_loads.append(req.req_id)
            self._lost.append(key)
        log.warning("kvreuse: request %s: chunk %s failed to load; %d blocks recomputed", req.req_id, key.hex()[:12],
                    len(blocks))

    def load_layer(self, layer_name: str) -> None:
        """Relocate and write this layer's share of every claimed chunk of the step."""
        if not self._jobs or layer_name in self._layers_done or layer_name not in self.layers:
            return
        t0 = time.perf_counter()
        i = self.layers[layer_name]
        cache = self.caches[layer_name]
        write = self.writers.get(layer_name)
        for job in self._jobs:  # the CPU or the device path (`kvreuse.connector.placing`)
            self._placers.for_job(job, cache).place_layer(job, i, cache, write)
        self._layers_done.add(layer_name)
        self._load_t += time.perf_counter() - t0
        if len(self._layers_done) == len(self.layers):
            ntok = sum(int(job.slots.numel()) for job in self._jobs)
            with self._lock:
                self._stats.load_seconds.append(self._load_t)
                self._load_obs = (self._load_obs[0] + self._load_t, self._load_obs[1] + ntok)
            self._jobs = []

    def finish_loads(self) -> None:
        """Place any layer whose attention did not call `wait_for_layer_load` (then nothing is lost)."""
        if not self._jobs:
            return
        for name in list(self.layers):
            if self._jobs:
                self.load_layer(name)

    def take_failed_blocks(self) -> set[int]:
        with self._lock:
            out, self._failed_blocks = self._failed_blocks, set()
        return out

    def take_report(self) -> KVReuseWorkerReport | None:
        """Keys lost (failed loads, evicted, refused, dropped) and demoted, requests left unsaved and
        requests whose load failed, since the last call; None when there is nothing to report."""
        ev = self.store.take_events()
        with self._lock:
            lost, self._lost = self._lost, []
            unsaved, self._unsaved = self._unsaved, []
            failed, self._failed_loads = self._failed_loads, []
            load_s, load_tokens = self._load_obs
            self._load_obs = (0.0, 0)
        lost += [k.digest for k in ev.evicted]
        if not (lost or ev.demoted or unsaved or failed or load_tokens):
            return None
        return KVReuseWorkerReport(list(dict.fromkeys(lost)), list(dict.fromkeys(k.digest for k in ev.demoted)),
                                   unsaved, load_s, load_tokens, list(dict.fromkeys(failed)))

    # ---------------------------------------------------------------- save
    def save(self, meta: KVReuseMetadata, wait: bool = True) -> None:
        """Copy each new chunk's KV out of the paged cache and hand it to the store (which returns at once).

        `wait=False` (the connector, at the end of a step's forward): on CPU caches the copy runs on this
        worker's copy thread, overlapping the step's sampling and output and the next steps' forwards;
        `settle_saves` must run before anything writes the cache again (the connector calls it in
        `handle_preemptions`, which vLLM runs at the start of every step, before it zeroes, copies or
        writes any block, with the blocks that step allocates: only a copy reading one of those is
        waited for; a finished or preempted request's blocks are written again only once they are
        allocated anew).  On a GPU the copy is one fused kernel launched here, on the forward's stream
        (launched from a thread of its own it would go to another stream, unordered with the forward's
        writes); the store's thread waits for it through a CUDA event (`kvreuse.store.ready`).
        """
        if not meta.saves:
            return
        assert self.spec is not None
        reqs = []
        with self._lock:
            failed = set(self._failed_blocks)  # this step's (vLLM takes them after the save)
        for req in meta.saves:
            if req.req_id in self._failed_reqs or not failed.isdisjoint(req.block_ids):
                # computed over blocks a failed load never wrote: its own, or one it shares through vLLM's
                # prefix cache (vLLM rolls both back)
                with self._lock:
                    self._unsaved.append(req.req_id)
            else:
                reqs.append(req)
        if not reqs:
            return
        if wait or next(iter(self.caches.values())).device.type != "cpu":
            self.settle_saves()
            self._copy_out(reqs)
            return
        if len(self._copying) >= _MAX_COPIES_IN_FLIGHT:
            self.settle_saves()
        blocks = frozenset(b for r in reqs for b in r.block_ids)
        keys = frozenset(it.key for r in reqs for it in r.items)
        self._copying.append((self._copier.submit(self._copy_out_gated, self._steps, reqs), blocks, keys))

    def _open_gate(self) -> None:
        """A step starts (or a caller waits for copies): copy-outs held at the gate go."""
        with self._gate:
            self._steps += 1
            self._gate.notify_all()

    def _copy_out_gated(self, step: int, reqs: list[ReqSave]) -> None:
        """`_copy_out`, once the step after the save's has started (at most `_COPY_GATE_S` later).

        The end of a step is the engine's critical path: its output travels back, the scheduler plans the
        next step (new prompts are chunked and matched then) and sends it.  Measured on a 2-core host,
        a copy-out started there shared the scheduler's core with it and made each prefill step ~2.5 ms
        longer; started with the next step, it overlaps that step's forward, which it only meets at the GIL.
        """
        with self._gate:
            self._gate.wait_for(lambda: self._steps > step, timeout=_COPY_GATE_S)
        self._copy_out(reqs)

    def settle_saves(self, fresh: list[int] | None = None, keys: set[bytes] | None = None) -> None:
        """Wait for the copies `save(wait=False)` started: every one, or (`fresh`: the blocks a step is about
        to allocate anew, see `KVReuseMetadata.fresh_blocks`; `keys`: chunks it loads) each one reading any
        of those blocks or saving any of those chunks, and every copy queued before it.  The rest go on
        reading blocks nothing writes: a block is zeroed or written whole only once it is allocated again,
        and a running request's blocks only gain tokens in slots the copy does not read.  Never raises: a
        failed copy is logged and its chunks are counted as dropped saves, reported lost."""
        if not self._copying:
            return
        self._open_gate()  # called as each step starts (`handle_preemptions`) and wherever a copy is awaited
        if fresh is None:
            last = len(self._copying)
        else:
            new, want = set(fresh), keys or set()
            last = max((i + 1 for i, (_, blocks, saved) in enumerate(self._copying)
                        if not blocks.isdisjoint(new) or not saved.isdisjoint(want)), default=0)
        for fut, _, _ in self._copying[:last]:
            fut.result()
        self._copying = [c for c in self._copying[last:] if not c[0].done()]

    def _copy_out(self, reqs: list[ReqSave]) -> None:
        try:
            self._copy_out_now(reqs)
        except Exception:
            log.exception("kvreuse: copying saved chunks out of the KV cache failed; they are not stored")
            with self._lock:
                for req in reqs:
                    self._stats.dropped_saves += len(req.items)
                    self._lost.extend(it.key for it in req.items)

    def _copy_out_now(self, reqs: list[ReqSave]) -> None:
        assert self.spec is not None
        t0 = time.perf_counter()
        names = sorted(self.layers, key=self.layers.get)
        for req in reqs:
            # the items' token ranges, adjacent ones merged (a prompt's new chunks are mostly one run)
            runs: list[list[int]] = []
            for it in req.items:
                if runs and runs[-1][1] == it.start:
                    runs[-1][1] = it.end
                else:
                    runs.append([it.start, it.end])
            idx = torch.cat([torch.arange(a, b) for a, b in runs])
            slots = block_slots(req.block_ids, self.spec.block_size, 0, int(idx.max()) + 1)[idx]
            k, v = gather([self.caches[n] for n in names], self.spec, slots)  # [L, N, H, D] (fused on GPU)
            ready = ReadyAfter.record(k, v)  # on GPU, queued on the forward's stream: the store's thread waits for it
            toks = torch.tensor([t for it in req.items for t in it.token_ids], dtype=torch.int64)
            # each item's slices, a few calls a request (not per item: every torch call from this thread can
            # hand the GIL to the forward and wait to get it back).  [L, n, H, D] K and V, owned by the store
            # from here (gather made a copy; the store's thread compacts each slice to its own bytes)
            sizes = [it.end - it.start for it in req.items]
            parts = zip(torch.split(toks, sizes), torch.split(idx, sizes), torch.split(k, sizes, dim=1),
                        torch.split(v, sizes, dim=1))
            chunks = []
            for it, (tok, at, kc, vc) in zip(req.items, parts):
                pos = self._frame(torch.tensor(it.positions, dtype=torch.int64) if it.positions is not None else at)
                chunks.append(IngestChunk(ChunkKey(it.key), tok, pos, kc, vc, it.context, it.recent, ready=ready))
            queued = sum(self.store.ingest_many(chunks, rope=self.rope))  # one hand-over per request
            with self._lock:
                self._stats.saved_chunks += queued
                self._stats.dropped_saves += len(chunks) - queued
        with self._lock:
            self._stats.save_seconds.append(time.perf_counter() - t0)

    # ---------------------------------------------------------------- stats
    def stats_quiet(self) -> bool:
        """No counter moved since the last `take_stats` (a check, no copy: asked every step)."""
        with self._lock:
            return self._stats.counters_empty()

    def take_stats(self, now: float | None = None) -> ReuseStats:
        """Counters since the last call; the store's gauges and counters only when its last read is a
        period old (reading them takes the store's lock: not on every step).

        Tensor parallel: vLLM sums the ranks' stats; what each rank reports is
        :meth:`ReuseStats.for_rank` (chunks and tokens once, each rank's own store events summed).
        Failed loads go to the scheduler in the worker report (:meth:`take_report`), counted once
        over all ranks.
        """
        with self._lock:
            s, self._stats = self._stats, ReuseStats()
        now = time.monotonic() if now is None else now
        if now - self._last_store_t < _STORE_SNAPSHOT_PERIOD_S:
            return s.for_rank(self.tp_rank, self.tp_size)
        snap = self.store.snapshot_stats(blocking=False)  # between two steps: never wait for the store's lock
        if snap is None:
            return s.for_rank(self.tp_rank, self.tp_size)  # read at the next step
        self._last_store_t = now
        last = self._last_store
        for name, t in snap.tiers.items():
            s.store_bytes[name], s.store_budget_bytes[name], s.store_entries[name] = \
                t.used_bytes, t.budget_bytes, t.entries
            prev = last.tiers.get(name) if last is not None else None
            ev = t.evictions - (prev.evictions if prev else 0)
            if ev:
                s.evictions[name] = ev
            wrote = t.bytes_written - (prev.bytes_written if prev else 0)
            if wrote:
                s.bytes_saved[name] = wrote
            if name in ("disk", "redis"):
                rh = t.hits - (prev.hits if prev else 0)
                if rh:
                    s.rehydrations[name] = rh
        s.store_pending_bytes = self.store.pending_bytes()
        s.demotions = snap.demotions - (last.demotions if last is not None else 0)
        s.load_timeouts = snap.load_timeouts - (last.load_timeouts if last is not None else 0)
        s.captured_patches = snap.captured_patches - (last.captured_patches if last is not None else 0)
        self._last_store = snap
        return s.for_rank(self.tp_rank, self.tp_size)

    def close(self) -> None:
        self.settle_saves()
        self._copier.shutdown()
        self.store.close()
