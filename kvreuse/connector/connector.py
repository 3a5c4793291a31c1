"""KVReuseConnector: vLLM's v1 connector API translated to kvreuse's scheduler and worker sides.

Scheduler role (runs in the engine core): `get_num_new_matched_tokens` → claim,
`update_state_after_alloc` → commit the claim, `build_connector_meta` → loads and saves for the
step, `update_connector_output` → forget keys the worker lost, `request_finished` → drop state.

Worker role (runs in each worker): `register_kv_caches`, `start_load_kv` → fetch claimed chunks,
`wait_for_layer_load` → relocate + write that layer, `wait_for_save` → copy new chunks out of the
paged cache for the store, `get_block_ids_with_load_errors` → failed loads, recomputed by vLLM.

At startup, in each role, `kvreuse.connector.compat` refuses a vLLM version kvreuse was not read
against, Model Runner V2 and full CUDA graphs; `requires_piecewise_for_cudagraph` has vLLM lower
full graphs to PIECEWISE, so attention always waits for `wait_for_layer_load`.

Configuration is `kv_connector_extra_config` (see `kvreuse.connector.config`); metrics go through
`build_kv_connector_stats` / `build_prom_metrics` into vLLM's own `/metrics`.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole

from kvreuse.connector.compat import check_vllm
from kvreuse.connector.config import ConnectorConfig, ConnectorConfigError
from kvreuse.connector.fingerprint import model_fingerprint
from kvreuse.connector.metadata import KVReuseMetadata, KVReuseWorkerReport
from kvreuse.connector.stats import KVReuseConnectorStats, ReuseStats
from kvreuse.errors import KVReuseError, UnsupportedRope
from kvreuse.rope.spec import RopeSpec
from kvreuse.threads import configured_background_cpus, set_background_cpus

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.request import Request

log = logging.getLogger("kvreuse.connector")
_GAUGE_PERIOD_S = 1.0


def _token_ids(vllm_config: "VllmConfig", names: tuple[str, ...], *, as_text: bool = False) -> frozenset[int]:
    """Ids of `names`: vocabulary entries, or (`as_text`) strings the tokenizer encodes as one token."""
    if not names:
        return frozenset()
    try:
        from transformers import AutoTokenizer

        mc = vllm_config.model_config
        tok = AutoTokenizer.from_pretrained(mc.tokenizer, revision=mc.tokenizer_revision,
                                            trust_remote_code=mc.trust_remote_code)
        if as_text:
            enc = [tok.encode(n, add_special_tokens=False) for n in names]
            ids = [e[0] for e in enc if len(e) == 1]
        else:
            ids = tok.convert_tokens_to_ids(list(names))
        unk = tok.unk_token_id
        return frozenset(i for i in ids if i is not None and i != unk)
    except Exception as e:  # no tokenizer: content-defined cuts alone still work
        log.warning("kvreuse: cannot resolve boundary tokens %s (%s); using content-defined cuts only", names, e)
        return frozenset()


def _positions_fn(vllm_config: "VllmConfig"):
    """M-RoPE models: the model's own position function (see `kvreuse.connector.mrope`)."""
    from kvreuse.connector.mrope import positions_fn_from_vllm

    try:
        return positions_fn_from_vllm(vllm_config)
    except Exception as e:
        raise KVReuseError(f"kvreuse: the model uses M-RoPE but its position function is unavailable ({e}); "
                           "kvreuse cannot place KV for it") from e


def rope_for_model(model_config: Any, fidelity: str) -> RopeSpec:
    """The model's RoPE, as relocation needs it.  A model whose positions cannot be moved (no RoPE, or a RoPE
    that depends on the prompt's length: `UnsupportedRope`) is served at fidelity "exact" only, which places KV
    at the very positions it was computed at; a looser server fidelity is refused at startup."""
    try:
        return RopeSpec.from_hf_config(model_config.hf_text_config)
    except UnsupportedRope as e:
        if fidelity != "exact":
            raise KVReuseError(f"kvreuse: policy.fidelity {fidelity!r} places KV at new positions, which this model "
                               f"does not allow ({e}); serve it with policy.fidelity \"exact\"") from e
        log.info("kvreuse: %s; only exact KV is placed, at the positions it was computed at", e)
        # never asked to move a key (exact KV is placed where it was computed): a table of zero angles
        head = int(model_config.get_head_size())
        return RopeSpec(rotary_dim=head - head % 2, inv_freq=torch.zeros(head // 2), scaling="none")


def check_parallelism(parallel_config: Any) -> None:
    """Refuse (at start-up, KVReuseError) what kvreuse does not serve: pipeline parallelism.

    Tensor parallelism is served: each rank stores and places its own KV heads under its own
    fingerprint.  With pipeline parallelism each stage would hold only some layers' KV, and
    that is untested, so it is refused rather than risked.
    """
    pp = int(getattr(parallel_config, "pipeline_parallel_size", 1) or 1)
    if pp > 1:
        raise KVReuseError(f"kvreuse does not support pipeline parallelism (pipeline_parallel_size={pp}); "
                           "serve with --pipeline-parallel-size 1 (tensor parallelism is supported)")


class KVReuseConnector(KVConnectorBase_V1):
    """Position-free chunk reuse: stored chunks are placed at any position, in any order."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        check_parallelism(vllm_config.parallel_config)
        check_vllm(vllm_config)  # version, V1 model runner, no full CUDA graphs (kvreuse.connector.compat)
        super().__init__(vllm_config, role, kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        allow_faults = bool(extra.pop("allow_fault_injection", False))
        self.cfg = ConnectorConfig.from_extra_config(extra)
        # A failed load is recomputed, never fatal (DESIGN: a cache miss is never an error).
        self._kv_transfer_config.kv_load_failure_policy = "recompute"
        self._scheduler = self._worker = None
        self._last_gauges = 0.0
        self._rope = rope_for_model(vllm_config.model_config, self.cfg.policy.fidelity)  # both roles refuse alike
        key_fp = model_fingerprint(vllm_config, 0, weights_version=self.cfg.weights_version)
        if role == KVConnectorRole.SCHEDULER:
            from vllm.platforms import current_platform

            from kvreuse.connector.scheduler import SchedulerSide

            ch = self.cfg.chunking
            self._scheduler = SchedulerSide(self.cfg, key_fp.digest, _token_ids(vllm_config, ch.boundary_tokens),
                                            allow_faults, _positions_fn(vllm_config),
                                            end_ids=_token_ids(vllm_config, ch.end_tokens, as_text=True),
                                            block_size=vllm_config.cache_config.block_size,
                                            rank_digests=[f.digest for f in key_fp.all_ranks()],
                                            split_seeded=not current_platform.is_cpu())
            cls = vllm_config.scheduler_config.scheduler_cls
            if getattr(cls, "__name__", str(cls or "")).rsplit(".", 1)[-1] != "SegmentedScheduler":
                log.warning("kvreuse: vLLM's own scheduler claims only a prefix, so the first chunk that is not "
                            "stored ends reuse; add --scheduler-cls kvreuse.connector.segmented.SegmentedScheduler "
                            "(kvreuse serve does) to place stored chunks anywhere in a prompt, and to keep a block whose "
                            "load failed out of vLLM's prefix cache when its request is aborted before recomputing it "
                            "(docs/operations.md#failures)")
        else:
            from vllm.distributed.parallel_state import (get_pipeline_model_parallel_rank,
                                                         get_tensor_model_parallel_rank)

            from kvreuse.connector.worker import WorkerSide

            try:
                rank, pp_rank = get_tensor_model_parallel_rank(), get_pipeline_model_parallel_rank()
            except Exception:  # no distributed state (single process)
                rank, pp_rank = 0, 0
            rope = self._rope
            cpus = configured_background_cpus(vllm_config)  # before any kvreuse thread starts
            set_background_cpus(cpus)
            if cpus:
                log.info("kvreuse: background threads on CPUs %s (off the worker's OpenMP cores)", sorted(cpus))
            fp = model_fingerprint(vllm_config, rank, pp_rank, weights_version=self.cfg.weights_version)
            self._worker = WorkerSide(self.cfg, rope, fp)

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        """Always: a full CUDA graph replays attention without `wait_for_layer_load`, so placed KV would land
        after attention read the cache; vLLM lowers full graphs to PIECEWISE on this answer."""
        return True

    # ============================================================ worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Read each layer's cache layout from vLLM's own description; refuse here what kvreuse cannot address.

        vLLM 0.32 hands over per-layer `[B, H, N, C]` views (in kernel blocks where it splits blocks);
        the group, block size and heads come from its `KVCacheConfig`, the stride order from the
        resolved `KVCacheLayout`, the reading of `C` from each layer's backend (`kvreuse.layout`).
        """
        from kvreuse.layout import layouts_from_kv_cache_config

        mc = self._vllm_config.model_config
        cc = self._vllm_config.cache_config
        heads = mc.get_num_kv_heads(self._vllm_config.parallel_config)
        ctx = self._vllm_config.compilation_config.static_forward_context
        backends = {name: ctx[name].get_attn_backend().get_name() for name in kv_caches
                    if name in ctx and hasattr(ctx[name], "get_attn_backend")}
        kv_layout = getattr(cc, "kv_cache_layout", None)
        layouts, writers = None, {}
        if self._kv_cache_config is not None:
            # the CPU backend picks a kernel family per layer (`layer.isa`, set when its metadata builder was
            # made, before this call); "amx" tiles the page (kvreuse.layout.Reading.CPU_ATTN_AMX)
            isas = {name: ctx[name].isa for name in kv_caches if isinstance(getattr(ctx.get(name), "isa", None), str)}
            layouts = layouts_from_kv_cache_config(kv_caches, self._kv_cache_config, backends,
                                                   kv_cache_dtype=cc.cache_dtype, kv_layout=kv_layout, isas=isas)
            writers = self._check_cpu_layouts(layouts, isas)
        self._worker.register(kv_caches, next(iter(backends.values()), None), heads, mc.get_head_size(),
                              layouts=layouts, block_size=cc.block_size, kv_cache_dtype=cc.cache_dtype,
                              kv_layout=kv_layout, writers=writers)

    @staticmethod
    def _check_cpu_layouts(layouts: dict, isas: dict[str, str]) -> dict:
        """For the CPU backend, check kvreuse's reading against vLLM's own cache write (once per kind of
        layer), so that a layout kvreuse misreads is refused at startup, never served.  Returns that
        write per CPU layer (`WorkerSide.register`'s `writers`)."""
        from kvreuse.layout import Reading
        from kvreuse.paged import check_against_vllm

        isa_of = {name: isas.get(name, "vec") for name, lay in layouts.items()
                  if lay.reading in (Reading.CPU_ATTN, Reading.CPU_ATTN_AMX)}
        if not isa_of:
            return {}
        from vllm import _custom_ops as ops

        def writer(isa: str):
            def write_split(k, v, key_cache, value_cache, slots):  # as vLLM's CPU backend splits its page
                ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, isa)

            def write(k, v, cache, slots):
                nb, h, n, _ = cache.shape
                write_split(k, v, *cache.view(nb, h, 2 * n, -1).chunk(2, dim=2), slots)
            return write_split, write

        made = {isa: writer(isa) for isa in set(isa_of.values())}
        for lay, isa in {(layouts[name], isa) for name, isa in isa_of.items()}:
            check_against_vllm(lay, made[isa][0])
        return {name: made[isa][1] for name, isa in isa_of.items()}

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        """Fetch this step's claimed chunks; layers are written in `wait_for_layer_load`."""
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVReuseMetadata)
        self._worker.start_load(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Relocate and write this layer's KV of the claimed chunks before its attention runs."""
        self._worker.load_layer(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return  # saves read every layer at once in wait_for_save, after the forward wrote them

    def wait_for_save(self) -> None:
        """Start copying new chunks out of the paged cache (on the worker's copy thread, overlapping the
        step's sampling); the store put runs off the critical path."""
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVReuseMetadata)
        self._worker.finish_loads()
        self._worker.save(meta, wait=False)

    def handle_preemptions(self, kv_connector_metadata: Any) -> None:
        """vLLM calls this at the start of every step, before it zeroes, copies or writes any block: a
        copy-out still reading a block this step allocates anew finishes here, so no block it reads is
        reused under it (copies of other blocks go on, overlapping the forward)."""
        if self._worker is not None:
            meta = kv_connector_metadata if isinstance(kv_connector_metadata, KVReuseMetadata) else None
            self._worker.settle_saves(meta.fresh_blocks if meta is not None else None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_failed_blocks() if self._worker is not None else set()

    def build_connector_worker_meta(self) -> KVReuseWorkerReport | None:
        return self._worker.take_report()

    def get_kv_connector_stats(self) -> KVReuseConnectorStats | None:
        if self._worker is not None:
            now = time.monotonic()
            if now - self._last_gauges < _GAUGE_PERIOD_S and self._worker.stats_quiet():
                return None  # most steps (vLLM asks twice a step): nothing to report, nothing built
            s = self._worker.take_stats()
            if s.counters_empty() and now - self._last_gauges < _GAUGE_PERIOD_S:
                return None
            self._last_gauges = now
        else:
            s = self._scheduler.take_stats()
            if s.is_empty():
                return None
        return KVReuseConnectorStats(data=s.to_dict())

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()

    # ============================================================ scheduler side
    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        """Tokens placed from the store after vLLM's prefix hit (a chunk-boundary claim; pure)."""
        return self._scheduler.matched(request, num_computed_tokens), False

    def update_state_after_alloc(self, request: "Request", blocks: Any, num_external_tokens: int) -> None:
        self._scheduler.after_alloc(request, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVReuseMetadata:
        kvm = self._kv_cache_manager
        return self._scheduler.build_meta(scheduler_output, lambda rid: kvm.get_block_ids(rid)[0])

    def update_connector_output(self, connector_output: Any) -> None:
        rep = getattr(connector_output, "kv_connector_worker_meta", None)
        if isinstance(rep, KVReuseWorkerReport):
            self._scheduler.lost(rep.lost_keys)
            self._scheduler.demoted(getattr(rep, "demoted_keys", None) or [])
            # vLLM has already rolled back the requests with failed loads (`_handle_invalid_blocks` runs first)
            self._scheduler.load_failed(getattr(rep, "failed_req_ids", None) or [])
            self._scheduler.unsaved(getattr(rep, "unsaved_req_ids", None) or [])
            # the ranks' reports are merged for the step: a request whose load failed on any rank counts once
            self._scheduler.stats.load_failures += len(getattr(rep, "failed_req_ids", None) or [])
            if rep.load_tokens:
                self._scheduler.cost.observe_load(rep.load_seconds, rep.load_tokens)

    def enable_segments(self, hash_block_size: int):
        """Called by `kvreuse.connector.segmented.SegmentedScheduler`: plan past gaps; returns the planner."""
        self._scheduler.segmented = True
        self._scheduler.hash_block_size = hash_block_size
        return self._scheduler

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Forget the request; the response's `kv_transfer_params` says what it was served
        (`{"kvreuse": {"fidelity": ..., "placed_tokens": {"exact": n, "approximate": n}, ...}}`)."""
        return False, self._scheduler.finished(request)

    # ============================================================ metrics
    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVReuseConnectorStats:
        return KVReuseConnectorStats(data=ReuseStats.from_dict(data).to_dict())

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        from kvreuse.connector.prom import KVReusePromMetrics

        return KVReusePromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)


__all__ = ["ConnectorConfigError", "KVReuseConnector"]
