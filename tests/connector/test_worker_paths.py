"""Worker side on synthetic paged caches (CPU_ATTN and FLASH): save, then load at a new position."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

pytest.importorskip("vllm")

from kvreuse.connector.claim import LoadItem, SaveItem, context_signature  # noqa: E402
from kvreuse.connector.config import ConnectorConfig  # noqa: E402
from kvreuse.connector.metadata import KVReuseMetadata, KVReuseWorkerReport, ReqLoad, ReqSave  # noqa: E402
from kvreuse.connector.stats import KVReuseConnectorStats, ReuseStats  # noqa: E402
from kvreuse.connector import placing as placing_module  # noqa: E402
from kvreuse.connector.worker import WorkerSide, detect_layout, layer_index  # noqa: E402
from kvreuse.ops import place, relocate  # noqa: E402
from kvreuse.errors import KVReuseError  # noqa: E402
from kvreuse.layout import Reading, allocate  # noqa: E402
from kvreuse.paged import block_slots, gather_kv, scatter_kv  # noqa: E402
from kvreuse.rope.spec import RopeSpec  # noqa: E402
from kvreuse.store import ChunkKey, ModelFingerprint, StoreConfig  # noqa: E402
from tests.support.redis_server import redis_server_or_skip  # noqa: E402

L, H, D, BS, NB = 2, 2, 32, 16, 8
ROPE = RopeSpec.from_hf_config({"hidden_size": 64, "num_attention_heads": 2, "head_dim": D, "rope_theta": 10000.0,
                                "max_position_embeddings": 4096, "model_type": "llama"})


def make_caches(backend: str, dtype=torch.float32):
    """vLLM 0.32 per-layer views: CPU_ATTN's [NB, H, BS, 2D] pages, or FlashAttention's over one LBNHC buffer."""
    if backend == "CPU_ATTN":
        return {f"model.layers.{i}.self_attn.attn": torch.zeros(NB, H, BS, 2 * D, dtype=dtype) for i in range(L)}
    views, _ = allocate("LBNHC", Reading.KV_SPLIT, num_layers=L, num_blocks=NB, num_heads=H, block_size=BS,
                        head_size=D, dtype=dtype)
    return {f"model.layers.{i}.self_attn.attn": v.zero_() for i, v in enumerate(views)}


@pytest.mark.parametrize("backend", ["CPU_ATTN", "FLASH_ATTN"])
def test_save_then_load_relocated(backend):
    w = WorkerSide(ConnectorConfig(), ROPE, ModelFingerprint("Tiny", "w", "float32"))
    caches = make_caches(backend)
    w.register(caches, backend, H, D)
    spec = w.spec
    # request 1: chunk of 20 tokens at positions 5..25 in blocks [3, 1]
    n, src0, dst0 = 20, 5, 37
    k = torch.randn(L, n, H, D)
    v = torch.randn(L, n, H, D)
    blocks1 = [3, 1]
    slots1 = block_slots(blocks1, BS, src0, src0 + n)
    for i, name in enumerate(caches):
        scatter_kv(caches[name], spec, k[i], v[i], slots1)
    toks = tuple(range(100, 100 + n))
    key = b"k" * 16
    w.save(KVReuseMetadata(saves=[ReqSave("r1", blocks1, [SaveItem(key, toks, src0, src0 + n,
                                                                    context_signature(()), True)])]))
    w.store.flush()
    # request 2: the same chunk at 37..57 in blocks [6, 0, 2, 5]
    blocks2 = [6, 0, 2, 5]
    item = LoadItem(key, toks, 0, n, dst0, context_signature(()), "reorder")
    w.start_load(KVReuseMetadata(loads=[ReqLoad("r2", blocks2, [item], fidelity="fast")]))
    for name in caches:
        w.load_layer(name)
    slots2 = block_slots(blocks2, BS, dst0, dst0 + n)
    for i, name in enumerate(caches):
        gk, gv = gather_kv(caches[name], spec, slots2)
        want = relocate(k[i], torch.arange(src0, src0 + n), torch.arange(dst0, dst0 + n), ROPE)
        torch.testing.assert_close(gk, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gv, v[i])
    s = w.take_stats()
    assert s.claims == {"reorder": 1} and s.reused_tokens == n and s.saved_chunks == 1
    assert s.store_entries["device"] == 1
    w.close()


@pytest.mark.parametrize("patch_fit", ["demotion", "ingest"])
def test_a_new_contexts_patch_is_fitted_when_policy_patch_fit_says(patch_fit):
    """A stored chunk saved again in a new context (at other positions): its KV is kept either way; its patch is
    fitted at once with patch_fit "ingest", and with "demotion" only once demotion drops that KV; either way the
    context then reads patched."""
    cfg = ConnectorConfig.from_extra_config({"policy": {"fidelity": "accurate", "patch_fit": patch_fit}})
    w = WorkerSide(cfg, ROPE, ModelFingerprint("Tiny", "w", "float32"))
    caches = make_caches("CPU_ATTN")
    w.register(caches, "CPU_ATTN", H, D)
    n, toks, key = 20, tuple(range(100, 120)), b"k" * 16
    g = torch.Generator().manual_seed(3)
    for req, blocks, start, ctx in (("r1", [3, 1], 5, ()), ("r2", [6, 0, 2, 5], 37, (b"p" * 16,))):
        slots = block_slots(blocks, BS, start, start + n)
        for name in caches:
            scatter_kv(caches[name], w.spec, torch.randn(n, H, D, generator=g), torch.randn(n, H, D, generator=g),
                       slots)
        w.save(KVReuseMetadata(saves=[ReqSave(req, blocks, [SaveItem(key, toks, start, start + n,
                                                                      context_signature(ctx), not ctx)])]))
        w.store.flush()
    ck = ChunkKey(key)
    ctx2 = context_signature((b"p" * 16,))
    assert w.store.get(ck, toks, context=ctx2).how == "exact"  # its own KV, as computed
    assert w.store.snapshot_stats().captured_patches == (1 if patch_fit == "ingest" else 0)
    w.store.demote(ck)
    w.store.flush()
    assert w.store.snapshot_stats().captured_patches == 1
    assert w.store.get(ck, toks, context=ctx2).how == "patched"
    w.close()


@pytest.mark.parametrize("tile", [None, 20, 5])   # one tile (the default at this size), 5 tiles, too many: whole
@pytest.mark.parametrize("backend", ["CPU_ATTN", "FLASH_ATTN"])
def test_cpu_load_of_many_chunks_writes_what_the_reference_places(backend, tile, monkeypatch):
    """bf16 chunks of odd lengths, placed one after another across blocks out of order: the worker's CPU
    path (one rotation table and one set of block runs for all layers, relocation in token tiles, tokens
    innermost for CPU_ATTN's transposed keys) writes the cache bit for bit as the reference `place` does,
    chunk by chunk."""
    if tile is not None:
        monkeypatch.setattr(placing_module, "_SERIAL_ELEMENTS", tile * H * D)
    w = WorkerSide(ConnectorConfig(), ROPE, ModelFingerprint("Tiny", "w", "bfloat16"))
    caches = make_caches(backend, torch.bfloat16)
    w.register(caches, backend, H, D)
    g = torch.Generator().manual_seed(3)
    blocks, start, items, chunks = [6, 0, 3, 7, 2, 5], 9, [], []
    for j, n in enumerate([7, 16, 23, 5, 30]):
        key, toks, src0 = bytes([j + 1]) * 16, tuple(range(100 * j, 100 * j + n)), 3 * j
        k, v = (torch.randn(L, n, H, D, generator=g).to(torch.bfloat16) for _ in range(2))
        w.store.ingest(ChunkKey(key), torch.tensor(toks), torch.arange(src0, src0 + n), k, v, context_signature(()))
        items.append(LoadItem(key, toks, 0, n, start, context_signature(()), "exact"))
        chunks.append((k, v, torch.arange(src0, src0 + n), torch.arange(start, start + n)))
        start += n
    w.store.flush()
    w.start_load(KVReuseMetadata(loads=[ReqLoad("r", blocks, items, fidelity="fast")]))
    for name in caches:
        w.load_layer(name)
    assert not w.take_failed_blocks()
    want = make_caches(backend, torch.bfloat16)
    for k, v, src, dst in chunks:
        place(list(want.values()), w.spec, k, v, src, dst, block_slots(blocks, BS, int(dst[0]), int(dst[-1]) + 1), ROPE)
    for name in caches:
        assert torch.equal(caches[name].view(torch.int16), want[name].view(torch.int16)), name
    w.close()


@pytest.mark.skipif(not torch.cpu._is_amx_tile_supported(), reason="vLLM's AMX cache write needs AMX tiles")
def test_amx_page_load_through_vllms_writer_is_what_kvreuses_own_writes_give():
    """On the AMX-tiled page the worker writes a layer with vLLM's own `cpu_attn_reshape_and_cache` (one call,
    as the connector wires it); the cache is bit for bit what kvreuse's indexed writes give."""
    from vllm import _custom_ops as ops

    from kvreuse.layout import PagedLayout

    bs, d = 128, 64
    calls = []

    def write(k, v, cache, slots):
        calls.append(slots.numel())
        nb, h, n, _ = cache.shape
        kc, vc = cache.view(nb, h, 2 * n, -1).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, "amx")

    rope = RopeSpec.from_hf_config({"hidden_size": 128, "num_attention_heads": 2, "head_dim": d,
                                    "rope_theta": 10000.0, "max_position_embeddings": 4096, "model_type": "llama"})
    g = torch.Generator().manual_seed(5)
    chunks = [(bytes([j + 1]) * 16, tuple(range(100 * j, 100 * j + n)), 7 * j,
               *(torch.randn(L, n, H, d, generator=g).to(torch.bfloat16) for _ in range(2)))
              for j, n in enumerate([9, 130, 40])]
    out = []
    for writers in (None, "vllm"):
        caches = {f"model.layers.{i}.self_attn.attn": torch.zeros(4, H, bs, 2 * d, dtype=torch.bfloat16)
                  for i in range(L)}
        layouts = {n: PagedLayout(Reading.CPU_ATTN_AMX, 4, H, bs, d, d, tuple(c.stride()), torch.bfloat16, bs,
                                  "CPU_ATTN") for n, c in caches.items()}
        w = WorkerSide(ConnectorConfig(), rope, ModelFingerprint("Tiny", "w", "bfloat16"))
        w.register(caches, "CPU_ATTN", H, d, layouts=layouts, writers={n: write for n in caches} if writers else None)
        items, start = [], 50
        for key, toks, src0, k, v in chunks:
            n = len(toks)
            w.store.ingest(ChunkKey(key), torch.tensor(toks), torch.arange(src0, src0 + n), k, v,
                           context_signature(()))
            items.append(LoadItem(key, toks, 0, n, start, context_signature(()), "exact"))
            start += n
        items[1] = LoadItem(items[1].key, items[1].token_ids, 30, 130, items[1].dst_start + 30, items[1].context,
                            "exact")  # a piece of a chunk (edge fill)
        w.store.flush()
        w.start_load(KVReuseMetadata(loads=[ReqLoad("r", [3, 0, 2], items, fidelity="fast")]))
        for name in caches:
            w.load_layer(name)
        assert not w.take_failed_blocks()
        out.append(caches)
        w.close()
    assert calls == [9 + 100 + 40] * L  # one call a layer
    for name in out[0]:
        assert out[0][name].abs().sum() > 0
        assert torch.equal(out[0][name].view(torch.int16), out[1][name].view(torch.int16)), name


def test_failed_load_reports_blocks_and_lost_key():
    w = WorkerSide(ConnectorConfig(), ROPE, ModelFingerprint("Tiny", "w", "float32"))
    caches = make_caches("CPU_ATTN")
    w.register(caches, "CPU_ATTN", H, D)
    item = LoadItem(b"z" * 16, tuple(range(40)), 0, 40, 20, context_signature(()), "exact")
    w.start_load(KVReuseMetadata(loads=[ReqLoad("r", [4, 5, 6, 7], [item], fidelity="fast")]))
    assert w.take_failed_blocks() == {5, 6, 7}   # tokens 20..60 live in blocks 1..3 of the request
    rep = w.take_report()
    assert rep.lost_keys == [b"z" * 16] and rep.failed_req_ids == ["r"]  # counted by the scheduler
    w.close()


def test_layout_and_layer_names():
    assert layer_index("model.layers.11.self_attn.attn") == 11
    assert detect_layout(torch.zeros(2, 2, 16, 64), "CPU_ATTN", 2, 32).reading is Reading.CPU_ATTN
    assert detect_layout(torch.zeros(2, 2, 16, 64), "FLASH_ATTN", 2, 32).reading is Reading.KV_SPLIT
    with pytest.raises(KVReuseError, match="FLASH_ATTN"):   # vLLM < 0.32's 5-D cache is not 0.32's view
        detect_layout(torch.zeros(2, 4, 16, 2, 32), "FLASH_ATTN", 2, 32)


def test_stats_merge_and_carrier():
    a = ReuseStats(lookups_hit=2, claims={"exact": 1}, load_seconds=[0.1], store_bytes={"device": 10})
    b = ReuseStats(lookups_hit=1, claims={"exact": 2, "blind": 1}, store_bytes={"device": 12})
    m = a.merge(b)
    assert m.lookups_hit == 3 and m.claims == {"exact": 3, "blind": 1} and m.load_seconds == [0.1]
    c = KVReuseConnectorStats(data=a.to_dict()).aggregate(KVReuseConnectorStats(data=b.to_dict()))
    assert ReuseStats.from_dict(c.data) == m and not c.is_empty()
    assert KVReuseWorkerReport([b"1"]).aggregate(KVReuseWorkerReport([b"2"])).lost_keys == [b"1", b"2"]


def _stats_once_redis_reads(w: WorkerSide, entries: int) -> ReuseStats:
    """The worker's stats once its redis gauge reads `entries` (Redis is read in the background, a period apart)."""
    deadline, i = time.monotonic() + 30, 0  # a hang guard, not a speed bound
    while time.monotonic() < deadline:
        i += 1
        s = w.take_stats(now=1000.0 * i)
        if s.store_entries.get("redis") == entries:
            return s
        time.sleep(0.02)
    raise AssertionError(f"the redis gauge never read {entries} entries: {s.store_entries}")


class _CallerThreads:
    """Wraps a method: records the thread of every call, and the keyword arguments of each."""

    def __init__(self, fn) -> None:
        self.fn, self.threads, self.kwargs = fn, [], []

    def __call__(self, *args, **kw):
        self.threads.append(threading.get_ident())
        self.kwargs.append(kw)
        return self.fn(*args, **kw)


def test_redis_tier_gauges_count_its_entries():
    """The redis tier's gauges read Redis' own accounting: entries and bytes as stored, also after a removal."""
    srv = redis_server_or_skip()
    try:
        cfg = ConnectorConfig(store=StoreConfig(device_bytes=1 << 24, redis_url=srv.url, redis_bytes=1 << 24))
        w = WorkerSide(cfg, ROPE, ModelFingerprint("Tiny", "w", "float32"))
        caches = make_caches("CPU_ATTN")
        w.register(caches, "CPU_ATTN", H, D)
        for c in caches.values():
            c.normal_()
        items = [SaveItem(bytes([65 + j]) * 16, tuple(range(100 * j, 100 * j + 16)), 16 * j, 16 * j + 16,
                          context_signature(()), True) for j in range(3)]
        w.save(KVReuseMetadata(saves=[ReqSave("r1", [0, 1, 2], items)]))
        w.store.flush()
        s = _stats_once_redis_reads(w, 3)
        assert s.store_entries["device"] == 3 and s.store_bytes["redis"] == w.store.redis.actual_bytes() > 0
        w.store.redis.remove(w.store.memory[0].entries[next(iter(w.store.memory[0].entries))].key)
        _stats_once_redis_reads(w, 2)
        w.close()
    finally:
        srv.close()


def test_a_step_waits_no_longer_than_the_load_timeout_for_a_stalled_redis(monkeypatch):
    """Chunks only Redis holds, Redis stopped (SIGSTOP): the step's loads give up after `load_timeout_seconds`
    in all (the first waits it out, the second gets what is left: nothing), every claimed block is reported for
    recompute, and the timeouts are counted; the stats' Redis read never runs on the step's thread."""
    srv = redis_server_or_skip()
    try:
        cfg = ConnectorConfig(store=StoreConfig(redis_url=srv.url, redis_bytes=1 << 24), load_timeout_seconds=0.5)
        w = WorkerSide(cfg, ROPE, ModelFingerprint("Tiny", "w", "float32"))
        caches = make_caches("CPU_ATTN")
        w.register(caches, "CPU_ATTN", H, D)
        for c in caches.values():
            c.normal_()
        ctx = context_signature(())
        items = [SaveItem(bytes([65 + j]) * 16, tuple(range(100 * j, 100 * j + 16)), 16 * j, 16 * j + 16, ctx, True)
                 for j in range(2)]
        w.save(KVReuseMetadata(saves=[ReqSave("r1", [0, 1], items)]))
        w.store.flush()  # no memory tier: Redis alone holds them
        loads = [ReqLoad(f"q{j}", [4 + j], [LoadItem(it.key, it.token_ids, 0, 16, 0, ctx, "exact")], fidelity="fast")
                 for j, it in enumerate(items)]
        gets, usage = _CallerThreads(w.store.get), _CallerThreads(w.store.redis.usage)
        monkeypatch.setattr(w.store, "get", gets)
        monkeypatch.setattr(w.store.redis, "usage", usage)
        os.kill(srv.proc.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            w.start_load(KVReuseMetadata(loads=loads))
            w.finish_loads()
            assert time.monotonic() - t0 >= 0.5  # the first load waited its timeout (a lower bound)
            stats = [w.take_stats(now=100.0), w.take_stats(now=102.0)]  # the gauges' Redis read: in the background
        finally:
            os.kill(srv.proc.pid, signal.SIGCONT)
        timeouts = [kw["timeout"] for kw in gets.kwargs]  # one budget for the step, not one per load:
        assert len(timeouts) == 2 and 0.0 < timeouts[0] <= 0.5 and timeouts[1] == 0.0  # the second gets none
        deadline = time.monotonic() + 30  # the Redis read the stats started runs once Redis answers (a hang guard)
        while not usage.threads and time.monotonic() < deadline:
            time.sleep(0.02)
        assert usage.threads and threading.get_ident() not in usage.threads  # never on the step's thread
        assert w.take_failed_blocks() == {4, 5} and w.take_report().failed_req_ids == ["q0", "q1"]
        assert stats[0].load_timeouts == 2
        w.start_load(KVReuseMetadata(loads=[ReqLoad("q2", [6], loads[0].items, fidelity="fast")]))  # Redis answers again
        w.finish_loads()
        assert w.take_failed_blocks() == set() and w.take_stats(now=104.0).reused_tokens == 16
        w.close()
    finally:
        srv.close()
