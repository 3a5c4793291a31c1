"""Scheduler side: segment requests, claim stored chunks after vLLM's prefix hit, plan saves.

It never touches KV: it keeps a directory of the keys the worker stored (recorded when a save is
planned; a key is forgotten when the worker reports it lost) and tells the worker, per step, what
to place and what to save.  `matched` is pure, as vLLM requires of `get_num_new_matched_tokens`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from kvreuse.connector.claim import Claim, Directory, chunk_keys, plan_claim, plan_saves
from kvreuse.connector.config import ConnectorConfig
from kvreuse.connector.metadata import KVReuseMetadata, ReqLoad, ReqSave
from kvreuse.connector.mrope import PositionsFn
from kvreuse.connector.remote import RemoteLookup
from kvreuse.connector.segment import Chunk, mm_spans, segment
from kvreuse.connector.stats import ReuseStats

log = logging.getLogger("kvreuse.connector")


def opted_out(kv_transfer_params: dict[str, Any] | None) -> bool:
    """`{"kvreuse": false}` or `{"kvreuse": {"enabled": false}}` in a request's kv_transfer_params."""
    v = (kv_transfer_params or {}).get("kvreuse", True)
    if isinstance(v, dict):
        return v.get("enabled", True) is False
    return v is False or v == "off"


@dataclass
class _Req:
    request: Any
    chunks: list[Chunk]
    keys: list[bytes]
    claim: Claim | None = None
    load_pending: bool = False
    loaded: set[bytes] = field(default_factory=set)
    saved: bool = False
    counted: bool = False
    positions: torch.Tensor | None = None  # M-RoPE: [3, N] from the model's get_mrope_input_positions
    disabled: bool = False                 # positions could not be computed: no reuse for this request


class SchedulerSide:
    def __init__(self, cfg: ConnectorConfig, model_digest: bytes, boundary_ids: frozenset[int],
                 allow_fault_injection: bool = False, positions_fn: PositionsFn | None = None) -> None:
        self.cfg, self.model_digest, self.boundary_ids = cfg, model_digest, boundary_ids
        self.positions_fn = positions_fn  # M-RoPE models only
        self.allow_fault_injection = allow_fault_injection
        st = cfg.store  # with a shared Redis tier, also see what other instances stored there
        remote = RemoteLookup(st.redis_url, st.redis_bytes, model_digest) if st.redis_url and st.redis_bytes else None
        self.directory = Directory(remote)
        self.reqs: dict[str, _Req] = {}
        self.modalities: dict[str, list[str]] = {}  # request -> modality of each mm feature (encoder counts)
        self.stats = ReuseStats()

    def _state(self, request: Any) -> _Req:
        st = self.reqs.get(request.request_id)
        if st is None:
            tokens = list(request.prompt_token_ids or [])
            chunks = segment(tokens, self.cfg.chunking, boundary_ids=self.boundary_ids,
                             spans=mm_spans(getattr(request, "mm_features", None)))
            keys = chunk_keys(tokens, chunks, self.model_digest, getattr(request, "cache_salt", None))
            st = self.reqs[request.request_id] = _Req(request, chunks, keys)
            if self.positions_fn is not None:
                try:
                    st.positions = self.positions_fn(tokens, list(getattr(request, "mm_features", None) or []))
                except Exception as e:  # never guess positions: this request is served without kvreuse
                    log.warning("kvreuse: request %s: cannot compute M-RoPE positions (%s); not reused or saved",
                                request.request_id, e)
                    st.disabled = True
        return st

    def _off(self, st: _Req) -> bool:
        return st.disabled or not self._shares(st.request)

    def _shares(self, request: Any) -> bool:
        """The request neither opted out nor is unsalted under `isolation: "salted_only"`."""
        return not opted_out(request.kv_transfer_params) and self.cfg.shares_chunks(getattr(request, "cache_salt", None))

    def matched(self, request: Any, num_computed: int) -> int:
        """Tokens kvreuse can place beyond vLLM's `num_computed` prefix hit (no side effects but a memo)."""
        feats = getattr(request, "mm_features", None)
        if feats and request.request_id not in self.modalities:
            self.modalities[request.request_id] = [f.modality for f in feats]
        if not self.cfg.load or not self._shares(request):
            return 0
        st = self._state(request)
        if st.disabled:
            return 0
        tokens = request.prompt_token_ids or []
        claim = plan_claim(tokens, st.chunks, st.keys, self.directory, num_computed, self.cfg.policy.mode,
                           st.positions)
        st.claim = claim
        return claim.num_tokens

    def after_alloc(self, request: Any, num_external: int) -> None:
        st = self._state(request)
        if not st.counted and not self._off(st) and self.cfg.load:
            claim = st.claim
            if claim is not None:
                self.stats.lookups_hit += claim.hits if num_external else 0
                self.stats.lookups_miss += claim.misses + (0 if num_external else claim.hits)
            st.counted = True
        if num_external > 0:
            assert st.claim is not None and st.claim.num_tokens == num_external, "claim changed since it was offered"
            st.load_pending = True
            st.loaded = {it.key for it in st.claim.items}
            lo = st.claim.items[0].dst_start
            hi = lo + num_external
            for f in getattr(request, "mm_features", None) or ():
                end = f.mm_position.offset + f.mm_position.length
                if lo < end <= hi:  # every uncomputed token of the item is placed: its encoder never runs
                    self.stats.mm_items_reused[f.modality] = self.stats.mm_items_reused.get(f.modality, 0) + 1

    def build_meta(self, sched_out: Any, block_ids_of) -> KVReuseMetadata:
        meta = KVReuseMetadata()
        self._count_encoder_inputs(sched_out)
        for rid, st in self.reqs.items():
            if st.load_pending:
                params = st.request.kv_transfer_params or {}
                inject = self.allow_fault_injection and isinstance(params.get("kvreuse"), dict) \
                    and bool(params["kvreuse"].get("inject_load_failure"))
                meta.loads.append(ReqLoad(rid, list(block_ids_of(rid)), list(st.claim.items), inject))
                st.load_pending = False
        if not self.cfg.save:
            return meta
        computed = {r.req_id: r.num_computed_tokens for r in sched_out.scheduled_new_reqs}
        cached = sched_out.scheduled_cached_reqs
        computed.update(zip(cached.req_ids, cached.num_computed_tokens))
        for rid, n in computed.items():
            st = self.reqs.get(rid)
            if st is None or st.saved or self._off(st):
                continue
            prompt_len = len(st.request.prompt_token_ids or [])
            if n + sched_out.num_scheduled_tokens.get(rid, 0) < prompt_len:
                continue
            st.saved = True
            items = plan_saves(st.request.prompt_token_ids, st.chunks, st.keys, self.directory, st.loaded,
                               self.cfg.policy.capture_patches, st.positions)
            if items:
                meta.saves.append(ReqSave(rid, list(block_ids_of(rid)), items))
                for it in items:  # recorded now: the worker copies the KV out in this very step
                    self.directory.record(it.key, it.end - it.start, it.preceding)
        return meta

    def _count_encoder_inputs(self, sched_out: Any) -> None:
        """Count the encoder inputs vLLM scheduled this step (what its model runner encodes)."""
        for rid, idxs in (getattr(sched_out, "scheduled_encoder_inputs", None) or {}).items():
            mods = self.modalities.get(rid, [])
            for i in idxs:
                mod = mods[i] if i < len(mods) else "unknown"
                self.stats.encoder_inputs[mod] = self.stats.encoder_inputs.get(mod, 0) + 1

    def lost(self, keys: list[bytes]) -> None:
        for k in keys:
            self.directory.forget(k)

    def finished(self, request: Any) -> None:
        self.reqs.pop(request.request_id, None)
        self.modalities.pop(request.request_id, None)

    def take_stats(self) -> ReuseStats:
        s, self.stats = self.stats, ReuseStats()
        return s
