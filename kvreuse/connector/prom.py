"""Prometheus exposition of `ReuseStats` through vLLM's connector hook (vLLM's own `/metrics`)."""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics

from kvreuse.connector.stats import ReuseStats
from kvreuse.store.stats import LATENCY_BUCKETS_SECONDS

# name (without _total), kind, documentation, extra label
METRICS = [
    ("kvreuse_chunk_lookups", "counter", "Chunks looked up after vLLM's prefix hit, by result", "result"),
    ("kvreuse_claims", "counter", "Chunks claimed (placed from the store), by reuse policy", "policy"),
    ("kvreuse_reused_tokens", "counter", "Prompt tokens placed from the store instead of prefilled", None),
    ("kvreuse_saved_chunks", "counter", "Chunks whose KV was handed to the store", None),
    ("kvreuse_captured_patches", "counter",
     "Conditioning patches fitted for a stored chunk computed in a new context (at demotion or at ingest)", None),
    ("kvreuse_loaded_bytes", "counter", "KV bytes loaded from the store, by tier", "tier"),
    ("kvreuse_saved_bytes", "counter", "KV bytes saved to the store, by tier", "tier"),
    ("kvreuse_evictions", "counter", "Entries evicted under pressure, by tier", "tier"),
    ("kvreuse_demotions", "counter", "Entries demoted from full in-context KV to base + patch", None),
    ("kvreuse_rehydrations", "counter", "Entries loaded back from a lower tier, by tier", "tier"),
    ("kvreuse_load_failures", "counter", "Claimed chunks that failed to load (recomputed by vLLM)", None),
    ("kvreuse_load_timeouts", "counter",
     "Chunk loads that waited past load_timeout_seconds for a slow tier (recomputed; summed over TP ranks)", None),
    ("kvreuse_dropped_saves", "counter",
     "Chunks not saved because the store's bounded ingest queue was full (a save never blocks a step)", None),
    ("kvreuse_deferred_saves", "counter",
     "First-seen chunks not saved because recent requests recurred too little (policy.admission adaptive; "
     "saved when seen again)", None),
    ("kvreuse_encoder_inputs", "counter",
     "Multimodal items vLLM scheduled through the encoder (seen by the connector), by modality", "modality"),
    ("kvreuse_mm_items_reused", "counter",
     "Multimodal items placed from the store (their encoder run and prefill skipped), by modality", "modality"),
    ("kvreuse_segments", "counter",
     "Prompt segments after vLLM's prefix hit, by kind (placed from the store / computed in place)", "kind"),
    ("kvreuse_gap_tokens", "counter", "Prompt tokens computed in place after vLLM's prefix hit (gaps)", None),
    ("kvreuse_store_bytes", "gauge", "Bytes held by the store, by tier", "tier"),
    ("kvreuse_store_budget_bytes", "gauge", "Byte budget of the store, by tier", "tier"),
    ("kvreuse_store_entries", "gauge", "Entries held by the store, by tier", "tier"),
    ("kvreuse_store_pending_bytes", "gauge", "Bytes handed to the store's background thread and not yet done, by "
     "queue (ingest: saved chunks not yet stored; work: spills to disk and demoted contexts' patch fits)", "queue"),
    ("kvreuse_load_seconds", "histogram", "Time to place one request's claimed chunks", None),
    ("kvreuse_save_seconds", "histogram", "Time to read one request's new chunks out of the paged cache", None),
]

_FIELD = {"kvreuse_chunk_lookups": None, "kvreuse_claims": "claims", "kvreuse_reused_tokens": "reused_tokens",
          "kvreuse_saved_chunks": "saved_chunks", "kvreuse_captured_patches": "captured_patches",
          "kvreuse_loaded_bytes": "bytes_loaded", "kvreuse_saved_bytes": "bytes_saved",
          "kvreuse_evictions": "evictions", "kvreuse_demotions": "demotions", "kvreuse_rehydrations": "rehydrations",
          "kvreuse_load_failures": "load_failures", "kvreuse_load_timeouts": "load_timeouts",
          "kvreuse_dropped_saves": "dropped_saves", "kvreuse_deferred_saves": "deferred_saves",
          "kvreuse_encoder_inputs": "encoder_inputs",
          "kvreuse_mm_items_reused": "mm_items_reused", "kvreuse_segments": "segments", "kvreuse_gap_tokens": "gap_tokens",
          "kvreuse_store_bytes": "store_bytes",
          "kvreuse_store_budget_bytes": "store_budget_bytes", "kvreuse_store_entries": "store_entries",
          "kvreuse_store_pending_bytes": "store_pending_bytes",
          "kvreuse_load_seconds": "load_seconds", "kvreuse_save_seconds": "save_seconds"}


class KVReusePromMetrics(KVConnectorPromMetrics):
    """Registers the kvreuse_* families with vLLM's metric classes and records each step's stats."""

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._families: dict[str, Any] = {}
        # tensor parallel: each rank has its own store, so store gauges carry a `rank` label too
        pc = getattr(vllm_config, "parallel_config", None)
        self._ranked = int(getattr(pc, "tensor_parallel_size", 1) or 1) > 1
        for name, kind, doc, extra in METRICS:
            labels = list(labelnames) + ([extra] if extra else [])
            if kind == "gauge" and self._ranked:
                labels.append("rank")
            if kind == "counter":
                m = self._counter_cls(name=name, documentation=doc, labelnames=labels)
            elif kind == "gauge":
                m = self._gauge_cls(name=name, documentation=doc, labelnames=labels, multiprocess_mode="mostrecent")
            else:
                m = self._histogram_cls(name=name, documentation=doc, labelnames=labels,
                                        buckets=list(LATENCY_BUCKETS_SECONDS))
            self._families[name] = (m, kind, extra)
        # Pre-create the label sets that should read 0 before the first event.
        for idx, values in per_engine_labelvalues.items():
            for r in ("hit", "miss"):
                self._families["kvreuse_chunk_lookups"][0].labels(*values, r)
            self._families["kvreuse_reused_tokens"][0].labels(*values)
            self._families["kvreuse_load_failures"][0].labels(*values)
            self._families["kvreuse_load_timeouts"][0].labels(*values)
            self._families["kvreuse_dropped_saves"][0].labels(*values)
            self._families["kvreuse_deferred_saves"][0].labels(*values)
            self._families["kvreuse_demotions"][0].labels(*values)
            for kind in ("placed", "computed"):
                self._families["kvreuse_segments"][0].labels(*values, kind)
            self._families["kvreuse_gap_tokens"][0].labels(*values)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        s = ReuseStats.from_dict(transfer_stats_data)
        values = self.per_engine_labelvalues[engine_idx]
        m, _, _ = self._families["kvreuse_chunk_lookups"]
        if s.lookups_hit:
            m.labels(*values, "hit").inc(s.lookups_hit)
        if s.lookups_miss:
            m.labels(*values, "miss").inc(s.lookups_miss)
        for name, (m, kind, extra) in self._families.items():
            attr = _FIELD[name]
            if attr is None:
                continue
            v = getattr(s, attr)
            if kind == "histogram":
                for x in v:
                    m.labels(*values).observe(x)
            elif kind == "gauge":
                for key, x in v.items():
                    tier, _, rank = key.partition("#")  # "<tier>#<rank>" under tensor parallelism
                    m.labels(*values, tier, *([rank or "0"] if self._ranked else [])).set(x)
            elif isinstance(v, dict):
                for lab, x in v.items():
                    if x:
                        m.labels(*values, lab).inc(x)
            elif v:
                m.labels(*values).inc(v)
