"""Parallelism without servers: tensor-parallel ranks' stats counted once, pipeline parallelism refused.

Two worker sides stand for two TP ranks (each its own heads of a synthetic CPU paged cache and its
own store); their stats are merged the way vLLM merges the ranks' (`KVConnectorStats.aggregate`)
and exposed through kvreuse's Prometheus families on a private registry.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402

from kvreuse.cli import format_stats  # noqa: E402
from kvreuse.connector.claim import LoadItem, SaveItem, context_signature  # noqa: E402
from kvreuse.connector.config import ConnectorConfig  # noqa: E402
from kvreuse.connector.connector import KVReuseConnector, check_parallelism  # noqa: E402
from kvreuse.connector.metadata import KVReuseMetadata, ReqLoad, ReqSave  # noqa: E402
from kvreuse.connector.prom import KVReusePromMetrics  # noqa: E402
from kvreuse.connector.stats import KVReuseConnectorStats, ReuseStats  # noqa: E402
from kvreuse.connector.worker import WorkerSide  # noqa: E402
from kvreuse.errors import KVReuseError  # noqa: E402
from kvreuse.rope.spec import RopeSpec  # noqa: E402
from kvreuse.store import ChunkStore, ModelFingerprint, StoreConfig  # noqa: E402

H, D, BS, NB, N = 1, 32, 128, 4, 40  # one KV head per rank
ROPE = RopeSpec.from_hf_config({"hidden_size": 64, "num_attention_heads": 2, "head_dim": D, "rope_theta": 10000.0,
                                "max_position_embeddings": 4096, "model_type": "llama"})


def rank_stats(rank: int, tp_size: int) -> ReuseStats:
    """One rank saves a chunk, places it at another position, and reports."""
    w = WorkerSide(ConnectorConfig(), ROPE, ModelFingerprint("Tiny", "w", "float32", tp_rank=rank, tp_size=tp_size))
    w.register({"model.layers.0.self_attn.attn": torch.randn(NB, H, BS, 2 * D)}, "CPU_ATTN", H, D)
    toks, key, ctx = tuple(range(100, 100 + N)), b"k" * 16, context_signature(())
    w.save(KVReuseMetadata(saves=[ReqSave("r1", [0], [SaveItem(key, toks, 0, N, ctx, True)])]))
    w.store.flush()
    w.start_load(KVReuseMetadata(loads=[ReqLoad("r2", [1, 2], [LoadItem(key, toks, 0, N, 100, ctx, "exact")], fidelity="fast")]))
    w.finish_loads()
    s = w.take_stats()
    w.close()
    return s


def registry_metrics(tp_size: int) -> tuple[KVReusePromMetrics, CollectorRegistry]:
    reg = CollectorRegistry()
    types = {Gauge: functools.partial(Gauge, registry=reg), Counter: functools.partial(Counter, registry=reg),
             Histogram: functools.partial(Histogram, registry=reg)}
    cfg = SimpleNamespace(kv_transfer_config=None, parallel_config=SimpleNamespace(tensor_parallel_size=tp_size))
    return KVReusePromMetrics(cfg, types, ["engine"], {0: ["0"]}), reg


def fetch_like(reg: CollectorRegistry) -> dict[str, dict[str, float]]:
    """The registry's kvreuse gauges as `kvreuse stats` reads them from `/metrics` (engine label dropped)."""
    out: dict[str, dict[str, float]] = {}
    for fam in reg.collect():
        for smp in fam.samples:
            if fam.type == "gauge":
                labs = ",".join(f'{k}="{v}"' for k, v in smp.labels.items() if k != "engine")
                out.setdefault(smp.name, {})[labs] = smp.value
    return out


def test_tensor_parallel_stats_count_tokens_once():
    single = rank_stats(0, 1)
    r0, r1 = rank_stats(0, 2), rank_stats(1, 2)
    assert single.reused_tokens == N and single.claims == {"exact": 1} and single.saved_chunks == 1
    assert single.store_entries == {"device": 1}
    # rank 1 reports only what is its own: the bytes it moved and its store's gauges
    assert (r1.reused_tokens, r1.claims, r1.saved_chunks, r1.load_seconds) == (0, {}, 0, [])
    assert r1.bytes_loaded == r0.bytes_loaded == single.bytes_loaded != {}
    merged = KVReuseConnectorStats(data=r0.to_dict()).aggregate(KVReuseConnectorStats(data=r1.to_dict()))
    m = ReuseStats.from_dict(merged.data)
    assert m.reused_tokens == N and m.claims == {"exact": 1} and m.saved_chunks == 1 and len(m.load_seconds) == 1
    assert m.bytes_loaded == {t: 2 * b for t, b in single.bytes_loaded.items()}  # bytes: both ranks moved them
    assert m.store_entries == {"device#0": 1, "device#1": 1}                        # gauges: one per rank
    prom, reg = registry_metrics(2)
    prom.observe(merged.data)
    assert reg.get_sample_value("kvreuse_reused_tokens_total", {"engine": "0"}) == N
    for rank in ("0", "1"):
        assert reg.get_sample_value("kvreuse_store_entries", {"engine": "0", "tier": "device", "rank": rank}) == 1
    assert "store device rank 1" in format_stats(fetch_like(reg))  # `kvreuse stats` shows each rank's store
    prom1, reg1 = registry_metrics(1)  # a single rank: no rank label
    prom1.observe(single.to_dict())
    assert reg1.get_sample_value("kvreuse_store_entries", {"engine": "0", "tier": "device"}) == 1


def test_each_ranks_own_store_events_are_summed():
    """Each rank's store evicts and drops on its own: those events are summed over ranks, chunks counted once.

    Both ranks' device tiers hold one chunk of N tokens, so the second save evicts the first on
    each rank; rank 1's ingest queue is too small for the third, longer chunk and drops it.
    """
    toks = [tuple(range(100 * j, 100 * j + n)) for j, n in enumerate((N, N, 2 * N))]
    ctx = context_signature(())
    stats = []
    for rank in (0, 1):
        fp = ModelFingerprint("Tiny", "w", "float32", tp_rank=rank, tp_size=2)
        # a chunk of N tokens holds 2 * N * H * D * 4 = 10 KiB of KV (11 KiB with ids and positions)
        store = ChunkStore(StoreConfig(device_bytes=16 << 10), fp, fit_patch=None,
                           ingest_bytes=(12 << 10) if rank == 1 else (1 << 20))
        w = WorkerSide(ConnectorConfig(), ROPE, fp, store=store)
        w.register({"model.layers.0.self_attn.attn": torch.randn(NB, H, BS, 2 * D)}, "CPU_ATTN", H, D)
        for j, t in enumerate(toks):
            w.save(KVReuseMetadata(saves=[ReqSave(f"r{j}", [j], [SaveItem(bytes([65 + j]) * 16, t, 0, len(t), ctx,
                                                                            True)])]))
            w.store.flush()
        stats.append(w.take_stats())
        w.close()
    r0, r1 = stats
    assert r0.evictions == r1.evictions == {"device": 1}
    assert (r0.dropped_saves, r1.dropped_saves, r0.saved_chunks, r1.saved_chunks) == (0, 1, 3, 0)
    m = ReuseStats.from_dict(KVReuseConnectorStats(data=r0.to_dict()).aggregate(
        KVReuseConnectorStats(data=r1.to_dict())).data)
    assert m.evictions == {"device": 2} and m.dropped_saves == 1 and m.saved_chunks == 3
    prom, reg = registry_metrics(2)
    prom.observe(m.to_dict())
    assert reg.get_sample_value("kvreuse_evictions_total", {"engine": "0", "tier": "device"}) == 2
    assert reg.get_sample_value("kvreuse_dropped_saves_total", {"engine": "0"}) == 1


def test_pipeline_parallel_is_refused_at_startup():
    check_parallelism(SimpleNamespace(pipeline_parallel_size=1, tensor_parallel_size=2))
    for role in (KVConnectorRole.SCHEDULER, KVConnectorRole.WORKER):
        cfg = SimpleNamespace(parallel_config=SimpleNamespace(pipeline_parallel_size=2, tensor_parallel_size=1))
        with pytest.raises(KVReuseError, match=r"pipeline parallelism \(pipeline_parallel_size=2\).*"
                                               r"--pipeline-parallel-size 1"):
            KVReuseConnector(cfg, role)


def test_a_load_failing_on_any_rank_is_reported_once():
    """Rank 1 lacks a chunk rank 0 holds: the merged report names the request once (the scheduler counts it)."""
    toks, key, ctx = tuple(range(100, 100 + N)), b"q" * 16, context_signature(())
    reports = []
    for rank in (0, 1):
        w = WorkerSide(ConnectorConfig(), ROPE, ModelFingerprint("Tiny", "w", "float32", tp_rank=rank, tp_size=2))
        w.register({"model.layers.0.self_attn.attn": torch.randn(NB, H, BS, 2 * D)}, "CPU_ATTN", H, D)
        if rank == 0:
            w.save(KVReuseMetadata(saves=[ReqSave("r1", [0], [SaveItem(key, toks, 0, N, ctx, True)])]))
            w.store.flush()
            w.take_report()
        item = LoadItem(key, toks, 0, N, 100, ctx, "exact")
        missing = LoadItem(b"m" * 16, toks, 0, N, 100, ctx, "exact")
        w.start_load(KVReuseMetadata(loads=[ReqLoad("r2", [1, 2], [item], fidelity="fast"), ReqLoad("r3", [3, 4], [missing], fidelity="fast")]))
        w.finish_loads()
        reports.append(w.take_report())
        assert w.take_stats().load_failures == 0  # not a worker counter: never summed over ranks
        w.close()
    assert reports[0].failed_req_ids == ["r3"] and reports[1].failed_req_ids == ["r2", "r3"]
    assert reports[0].aggregate(reports[1]).failed_req_ids == ["r3", "r2"]
