"""Scheduler side: segment requests, plan placements, hand loads and saves to the workers.

It never touches KV.  It keeps a directory of the keys the worker stored (recorded when a save
is planned; a key is forgotten when the worker reports it lost or evicted) and, per request, a
plan (`kvreuse.connector.plan`): the placements of stored chunks in the prompt.

Two ways to run:
  * connector only (stock scheduler): vLLM's connector API claims a prefix, so only the
    placement at vLLM's prefix hit is used (`matched`); the first gap ends reuse.
  * with `kvreuse.connector.segmented.SegmentedScheduler`: the scheduler extension also
    advances a running request over each later placement (`advance`) and ends each computed
    step where the next placement starts (`cap`); the placed KV is written in the step that
    follows.

Saves are planned when a prompt is computed: its chunks the store lacks, less (under adaptive
admission, `kvreuse.connector.admission`) first-seen chunks while recent requests recur too little.

`matched` has no side effect but a memo, the block-hash salt below, which is idempotent, and
noting the request's chunks for admission once.

Provenance (`kvreuse.connector.fidelity`).  A request is planned at its own fidelity.  Blocks holding
KV placed under a policy other than exact, and every block after them, are cached by vLLM under block
hashes salted with the request's fidelity, so vLLM's own prefix cache never serves them under plain
hashes; a preempted request gets its plain hashes back before vLLM looks it up again, and is re-planned
at its own fidelity.  What the worker served decides the rest: an exact claim it could serve only from
other KV fails as a load (vLLM recomputes it), so a placement that stays in `used` is what was served,
and saves after the first approximate position are recorded under tainted context signatures.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
from typing import Any, Sequence

from kvreuse.connector.admission import Recurrence, in_context_id
from kvreuse.connector.claim import Directory, chunk_keys, chunk_namespace, prefix_signatures
from kvreuse.connector.config import ConnectorConfig
from kvreuse.connector.costs import CostModel
from kvreuse.connector.fidelity import MEASURED_LOSS, RequestOptions, salted
from kvreuse.connector.metadata import KVReuseMetadata, ReqLoad, ReqSave
from kvreuse.connector.mrope import PositionsFn
from kvreuse.connector.plan import Placement, Plan, plan_saves, plan_segments
from kvreuse.connector.remote import RemoteLookup
from kvreuse.connector.request_state import Phase, RequestState
from kvreuse.connector.segment import mm_spans, segment_prompt
from kvreuse.connector.stats import ReuseStats
from kvreuse.store import scan_index
from kvreuse.store.keys import AdapterKeys, AdapterUnresolved

log = logging.getLogger("kvreuse.connector")


def fresh_blocks(sched_out: Any) -> list[int]:
    """Blocks allocated to requests in this step (every KV cache group): new requests' blocks, running or
    resumed requests' new blocks, and whatever vLLM zeroes.  A block freed by a finished or preempted
    request is written again only once it is allocated anew, so it shows up here first."""
    out: set[int] = set()
    for r in getattr(sched_out, "scheduled_new_reqs", None) or ():
        for ids in getattr(r, "block_ids", None) or ():
            out.update(ids)
    cached = getattr(sched_out, "scheduled_cached_reqs", None)
    for groups in getattr(cached, "new_block_ids", None) or ():
        for ids in groups or ():
            out.update(ids)
    out.update(getattr(sched_out, "new_block_ids_to_zero", None) or ())
    return sorted(out)


class SchedulerSide:
    def __init__(self, cfg: ConnectorConfig, model_digest: bytes, boundary_ids: frozenset[int],
                 allow_fault_injection: bool = False, positions_fn: PositionsFn | None = None,
                 end_ids: frozenset[int] = frozenset(), block_size: int = 16,
                 rank_digests: Sequence[bytes] = (), split_seeded: bool = True) -> None:
        self.cfg, self.model_digest, self.boundary_ids, self.end_ids = cfg, model_digest, boundary_ids, end_ids
        self.positions_fn = positions_fn  # M-RoPE models only
        self.allow_fault_injection = allow_fault_injection
        self.hash_block_size = block_size
        self.segmented = False  # set by the scheduler extension
        # vLLM rewinds a seeded request's generator after each partial-prefill step, which a CPU generator cannot
        # do (the engine dies): False on the CPU platform, where such requests are not split
        self.split_seeded = split_seeded
        self.cost = CostModel(**dataclasses.asdict(cfg.cost))
        st = cfg.store  # with a shared Redis tier, also see what other instances stored there
        ranks = list(rank_digests) or [model_digest]  # every TP/PP rank's fingerprint: a chunk needs all of them
        remote = RemoteLookup(st.redis_url, st.redis_bytes, ranks) if st.redis_url and st.redis_bytes else None
        self.directory = Directory(remote)
        if st.disk_path and st.disk_bytes:  # restart-warm: what the workers' disk tiers hold (headers only)
            for r in scan_index(st.disk_path, ranks):
                for sig in r.contexts:
                    self.directory.record(r.key, r.num_tokens, sig, r.preceding.get(sig, ()))
        self.adapters = AdapterKeys()  # LoRA adapters' identities, read once per adapter
        pol = cfg.policy
        self.recurrence = Recurrence(pol.admission_window, pol.admission_min_share) \
            if pol.admission == "adaptive" else None
        # at "exact" only a chunk after the same chunks can be placed: admission counts recurrence in context
        self.recur_in_context = pol.fidelity == "exact"
        if pol.fidelity in MEASURED_LOSS:  # once a server: what the looser level was measured to cost
            log.warning("%s", MEASURED_LOSS[pol.fidelity])
        self.reqs: dict[str, RequestState] = {}
        self.modalities: dict[str, list[str]] = {}  # request -> modality of each mm feature (encoder counts)
        self.stats = ReuseStats()

    # ---------------------------------------------------------------- per-request state
    def _state(self, request: Any) -> RequestState:
        st = self.reqs.get(request.request_id)
        if st is None:
            tokens = list(request.prompt_token_ids or [])
            chunks, anchors = segment_prompt(tokens, self.cfg.chunking, boundary_ids=self.boundary_ids,
                                             end_ids=self.end_ids, spans=mm_spans(getattr(request, "mm_features", None)))
            # besides content and model, the cache salt and the LoRA adapter (name, path, files) separate keys
            salt, unresolved = getattr(request, "cache_salt", None), None
            try:
                lora = self.adapters.of(getattr(request, "lora_request", None))
            except AdapterUnresolved as e:  # never keyed by the adapter's name alone: served without kvreuse
                lora, unresolved = b"", e
            keys = chunk_keys(tokens, chunks, self.model_digest, salt, lora)
            opts = RequestOptions.parse(request.kv_transfer_params, self.cfg.policy.fidelity, self.allow_fault_injection)
            st = self.reqs[request.request_id] = RequestState(request, chunks, keys, anchors,
                                                              chunk_namespace(self.model_digest, salt, lora), opts)
            if unresolved is not None:
                log.warning("kvreuse: request %s: %s; not reused or saved", request.request_id, unresolved)
                st.to(Phase.OFF)
            if self.positions_fn is not None and st.phase is not Phase.OFF:
                try:
                    st.positions = self.positions_fn(tokens, list(getattr(request, "mm_features", None) or []))
                except Exception as e:  # never guess positions: this request is served without kvreuse
                    log.warning("kvreuse: request %s: cannot compute M-RoPE positions (%s); not reused or saved",
                                request.request_id, e)
                    st.to(Phase.OFF)
        return st

    def _off(self, st: RequestState) -> bool:
        return st.phase is Phase.OFF or not self._shares(st.request)

    def _shares(self, request: Any) -> bool:
        """The request neither opted out nor is unsalted under `isolation: "salted_only"`."""
        st = self.reqs.get(request.request_id)
        opts = st.opts if st is not None else RequestOptions.parse(request.kv_transfer_params, self.cfg.policy.fidelity)
        return opts.enabled and self.cfg.shares_chunks(getattr(request, "cache_salt", None))

    # ---------------------------------------------------------------- planning
    def matched(self, request: Any, num_computed: int) -> int:
        """Tokens kvreuse places right after vLLM's `num_computed` prefix hit; plans the rest of the prompt."""
        feats = getattr(request, "mm_features", None)
        if feats and request.request_id not in self.modalities:
            self.modalities[request.request_id] = [f.modality for f in feats]
        if not self.cfg.load or not self._shares(request):
            return 0
        st = self._state(request)
        if st.phase is Phase.OFF:
            return 0
        if st.phase in (Phase.PREFILL, Phase.SAVED):  # waiting again without a preemption report
            self._unsalt(st)
            st.reset()
        if st.seen is None and self.recurrence is not None:  # once per request, with vLLM's first prefix hit
            st.seen = self._observe(st, num_computed)
        if getattr(request, "skip_reading_prefix_cache", False):
            # prompt logprobs need every prompt token computed: vLLM reads no cache for it, nor does kvreuse
            # (its KV is computed whole, so its chunks are still saved)
            plan = Plan(num_computed)
        else:
            gaps = self.segmented and (self.split_seeded or not _seeded(request))
            plan = plan_segments(request.prompt_token_ids or [], st.chunks, st.keys, self.directory, num_computed,
                                 st.opts.fidelity, st.positions, self.cost, gaps=gaps,
                                 anchors=st.anchors, ns=st.ns, repair=self.cfg.policy.repair_tokens,
                                 repair_every=self.cfg.policy.repair_scope == "every")
        st.replan(plan)  # a new request, or one resumed after preemption (its blocks are gone)
        self._salt(st, plan.first_approximate)
        return plan.leading

    def _salt(self, st: RequestState, first_token: int | None) -> None:
        """Re-key vLLM's block hashes from the block holding `first_token` on, with the request's fidelity
        (idempotent; undone only by `preempted`).  vLLM chains later blocks' hashes from these, so every
        block after approximate KV is salted too."""
        if first_token is None:
            return
        req = st.request
        idx = first_token // self.hash_block_size
        if st.salted_from is not None and st.salted_from <= idx:
            return
        hashes = getattr(req, "block_hashes", None)
        if not hashes:
            return
        if st.salted_from is not None:  # salted from a later block already: start over from plain hashes
            self._unsalt(st)
        parent = None
        for i in range(idx, len(hashes)):  # a chain: each hash over its (salted) parent, as vLLM's own are
            h = bytes(hashes[i]) if parent is None else bytes(hashes[i]) + parent
            hashes[i] = parent = type(hashes[i])(salted(h, st.opts.fidelity))
        st.salted_from = idx

    def _unsalt(self, st: RequestState) -> None:
        """vLLM's own block hashes back from the first salted block on (recomputed by vLLM's hasher)."""
        req, idx = st.request, st.salted_from
        st.salted_from = None
        if idx is None or not getattr(req, "block_hashes", None):
            return
        del req.block_hashes[idx:]
        req.update_block_hashes()

    def preempted(self, req_ids: Sequence[str]) -> None:
        """Requests vLLM preempted: their blocks are gone.  Before vLLM looks them up in its prefix cache
        again, their block hashes are plain again, so a resumed request reads only exact blocks there;
        `matched` re-plans it at its own fidelity (and salts anew from its first approximate placement)."""
        for rid in req_ids:
            st = self.reqs.get(rid)
            if st is not None:
                self._unsalt(st)
                st.reset()
    def after_alloc(self, request: Any, num_external: int) -> None:
        st = self._state(request)
        plan = st.plan
        if st.phase in (Phase.WAITING, Phase.PLANNED):
            st.to(Phase.PREFILL)
        if not st.counted and not self._off(st) and self.cfg.load and plan is not None:
            self.stats.lookups_hit += plan.hits
            self.stats.lookups_miss += plan.misses
            st.counted = True
        if plan is None:
            return
        pf = st.prefill
        if num_external > 0:
            assert plan.leading == num_external, "claim changed since it was offered"
            pf.load_pending = True
            lead = plan.placements[0]
            pf.next_seg = 1
            pf.used.append(lead)
            self._count_mm_reused(request, lead.start, lead.end)
        elif plan.leading:  # offered but not taken (e.g. vLLM found a longer prefix hit): skip it
            pf.next_seg = 1

    def _count_mm_reused(self, request: Any, lo: int, hi: int) -> None:
        for f in getattr(request, "mm_features", None) or ():
            end = f.mm_position.offset + f.mm_position.length
            if lo < end <= hi:  # every uncomputed token of the item is placed: its encoder never runs
                self.stats.mm_items_reused[f.modality] = self.stats.mm_items_reused.get(f.modality, 0) + 1

    # ---------------------------------------------------------------- segmented prefill
    def advance(self, request: Any) -> int:
        """Tokens to add to a running request's `num_computed_tokens`: the placement starting there.

        Called by the scheduler extension before each step; the placement's KV is written by the
        worker in the first step that schedules the request (its blocks exist by then).
        """
        st = self.reqs.get(request.request_id)
        if st is None or st.plan is None:
            return 0
        n = request.num_computed_tokens
        places = st.plan.placements
        pf = st.prefill
        while pf.next_seg < len(places) and places[pf.next_seg].start < n:
            pf.next_seg += 1  # behind us (a failed load rolled back, or not taken)
        if pf.next_seg >= len(places) or places[pf.next_seg].start != n:
            return 0
        p = places[pf.next_seg]
        pf.next_seg += 1
        if any(self.directory.get(it.key) is None for it in p.items):
            return 0  # evicted since planning: compute it
        if n >= len(request.prompt_token_ids or ()) or p.end >= len(request.prompt_token_ids):
            return 0
        pf.pending.append(p)
        pf.used.append(p)
        self._count_mm_reused(request, p.start, p.end)
        return p.num_tokens

    def cap(self, request: Any, num_computed: int, num_new: int) -> int:
        """`num_new` cut where the next placement after `num_computed` starts (a computed step ends there)."""
        st = self.reqs.get(request.request_id)
        if st is None or not st.prefill.starts or not self.segmented:
            return num_new
        starts = st.prefill.starts
        i = bisect.bisect_right(starts, num_computed, lo=st.prefill.next_seg)
        if i < len(starts):
            return min(num_new, starts[i] - num_computed)
        return num_new

    # ---------------------------------------------------------------- step metadata
    def build_meta(self, sched_out: Any, block_ids_of) -> KVReuseMetadata:
        self.preempted(getattr(sched_out, "preempted_req_ids", None) or ())
        meta = KVReuseMetadata(fresh_blocks=fresh_blocks(sched_out))
        self._count_encoder_inputs(sched_out)
        scheduled = sched_out.num_scheduled_tokens
        for rid, st in self.reqs.items():
            if st.phase is Phase.PLANNED:
                # planned but not allocated this step: vLLM looks it up in its prefix cache again next step, under
                # plain hashes (salted ones would hit other requests' approximate blocks as if they were its own)
                self._unsalt(st)
                st.reset()
                continue
            items = []
            pf = st.prefill
            if pf.load_pending:
                items += pf.plan.placements[0].items
                pf.load_pending = False
            if pf.pending and rid in scheduled:
                items += [it for p in pf.pending for it in p.items]
                pf.pending = []
            if items:
                meta.loads.append(ReqLoad(rid, list(block_ids_of(rid)), list(items), st.opts.inject_failure,
                                          fidelity=st.opts.fidelity))
        if not self.cfg.save:
            return meta
        computed = {r.req_id: r.num_computed_tokens for r in sched_out.scheduled_new_reqs}
        cached = sched_out.scheduled_cached_reqs
        computed.update(zip(cached.req_ids, cached.num_computed_tokens))
        for rid, n in computed.items():
            st = self.reqs.get(rid)
            if st is None or st.phase is not Phase.PREFILL or st.ever_saved or self._off(st):
                continue
            prompt_len = len(st.request.prompt_token_ids or [])
            if n + scheduled.get(rid, 0) < prompt_len:
                continue
            st.to(Phase.SAVED)
            st.ever_saved = True
            self._count_segments(st, prompt_len)
            items = plan_saves(st.request.prompt_token_ids, st.chunks, st.keys, self.directory, st.placed,
                               self.cfg.policy.capture_patches, st.positions,
                               approximate_from=st.approximate_from())
            if st.seen is not None and self.recurrence.cold:
                items = self._admit(st, items)
            st.recorded = items
            if items:
                meta.saves.append(ReqSave(rid, list(block_ids_of(rid)), items))  # `recent` persists with the entry
                for it in items:  # recorded now: the worker copies the KV out in this very step
                    self.directory.record_save(it, st.anchors, st.ns)
        return meta

    def _observe(self, st: RequestState, num_computed: int) -> list[bool]:
        """`Recurrence.observe` of a new request: which of its chunks recur.  A server at fidelity "exact"
        observes chunks in their context (`in_context_id`): stored means stored after the same keys."""
        if not self.recur_in_context:
            return self.recurrence.observe(st.chunks, st.keys, num_computed, self.directory.__contains__)
        ids, stored = [], set()
        for k, sig in zip(st.keys, prefix_signatures(st.keys)):
            ids.append(in_context_id(sig, k))
            e = self.directory.get(k)
            if e is not None and sig in e.contexts:
                stored.add(ids[-1])
        return self.recurrence.observe(st.chunks, ids, num_computed, stored.__contains__)

    def _admit(self, st: RequestState, items: list) -> list:
        """Nothing recurs lately: a new text chunk is saved only if an earlier prompt had it too, and at
        fidelity "exact" a stored one in a new context only if an earlier prompt had it in that context
        (`kvreuse.connector.admission`); the rest are counted as deferred saves."""
        first = {c.start for c, seen in zip(st.chunks, st.seen) if not seen}
        kept = [it for it in items if not ((it.is_new or self.recur_in_context) and it.text and it.start in first)]
        self.stats.deferred_saves += len(items) - len(kept)
        return kept

    def _count_segments(self, st: RequestState, prompt_len: int) -> None:
        plan = st.plan
        if plan is None or st.segments_counted:
            return
        st.segments_counted = True
        placed_tokens = sum(p.num_tokens for p in st.used)
        computed = 0
        pos = plan.num_computed
        for p in st.used:
            computed += p.start > pos
            pos = p.end
        computed += pos < prompt_len
        self.stats.segments["placed"] = self.stats.segments.get("placed", 0) + len(st.used)
        self.stats.segments["computed"] = self.stats.segments.get("computed", 0) + computed
        self.stats.gap_tokens += max(prompt_len - plan.num_computed - placed_tokens, 0)

    def _count_encoder_inputs(self, sched_out: Any) -> None:
        """Count the encoder inputs vLLM scheduled this step (what its model runner encodes)."""
        for rid, idxs in (getattr(sched_out, "scheduled_encoder_inputs", None) or {}).items():
            mods = self.modalities.get(rid, [])
            for i in idxs:
                mod = mods[i] if i < len(mods) else "unknown"
                self.stats.encoder_inputs[mod] = self.stats.encoder_inputs.get(mod, 0) + 1

    # ---------------------------------------------------------------- worker reports, lifecycle
    def lost(self, keys: list[bytes]) -> None:
        """Keys the worker no longer holds (evicted, refused, or failed to load): never claimed again."""
        for k in keys:
            self.directory.forget(k)

    def demoted(self, keys: list[bytes]) -> None:
        """Entries the store now holds as base + patch: planned as recall (approximate) from now on, never
        as exact; a claim planned exact before the report arrives is failed by the worker instead."""
        for k in keys:
            self.directory.demote(k)

    def load_failed(self, req_ids: list[str]) -> None:
        """Requests with a failed load: vLLM rolled each back to the first failed block and recomputes from
        there, so the chunks placed past that point are computed in place (and saved as such)."""
        for rid in req_ids:
            st = self.reqs.get(rid)
            if st is None:
                continue
            n = st.request.num_computed_tokens
            keep = [Placement(tuple(it for it in p.items if it.dst_end <= n)) for p in st.used if p.start < n]
            st.prefill.used = [p for p in keep if p.items]

    def unsaved(self, req_ids: list[str]) -> None:
        """Requests whose save was dropped because a load failed in that step: what the directory recorded
        for it is undone (the store never got it), and the request saves again after the recompute."""
        for rid in req_ids:
            st = self.reqs.get(rid)
            if st is not None:
                if st.phase is Phase.SAVED:
                    st.to(Phase.PREFILL)
                st.ever_saved = False
                for it in st.recorded:
                    self.directory.unrecord(it.key, it.context)
                st.recorded = []

    def finished(self, request: Any) -> dict[str, Any] | None:
        """Forget the request; returns what the response's `kv_transfer_params` tells the client it got
        (None for a request kvreuse did not serve)."""
        st = self.reqs.pop(request.request_id, None)
        self.modalities.pop(request.request_id, None)
        if st is None or self._off(st) or not self.cfg.load:
            return None
        prov = st.provenance()
        first = st.approximate_from()
        n = len(request.prompt_token_ids or ())
        after = max(n - first - prov["approximate"], 0) if first is not None else 0
        return {"kvreuse": {"fidelity": st.opts.fidelity, "placed_tokens": prov,
                            "computed_after_approximate_tokens": after}}

    def take_stats(self) -> ReuseStats:
        s, self.stats = self.stats, ReuseStats()
        return s


def _seeded(request: Any) -> bool:
    """Whether vLLM samples the request with a generator of its own (`SamplingParams.sampling_type` RANDOM_SEED:
    a seed, and not greedy)."""
    kind = getattr(getattr(request, "sampling_params", None), "sampling_type", None)
    return getattr(kind, "name", None) == "RANDOM_SEED"
