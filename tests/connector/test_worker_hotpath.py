"""Worker hot path on synthetic CPU_ATTN caches: loads never wait on saves, failed loads poison nothing,
what is served is what is counted, and the store's evictions reach the scheduler's report."""

from __future__ import annotations

import threading
import time

import pytest
import torch

pytest.importorskip("vllm")

from kvreuse import fit_patch  # noqa: E402
from kvreuse.connector.claim import LoadItem, SaveItem, context_signature  # noqa: E402
from kvreuse.connector.config import ConnectorConfig, PolicyConfig  # noqa: E402
from kvreuse.connector.metadata import KVReuseMetadata, ReqLoad, ReqSave  # noqa: E402
from kvreuse.connector.worker import WorkerSide, served_policy  # noqa: E402
from kvreuse.ops import relocate  # noqa: E402
from kvreuse.paged import block_slots, gather_kv, scatter_kv  # noqa: E402
from kvreuse.rope.spec import RopeSpec  # noqa: E402
from kvreuse.store import ChunkEntry, ChunkKey, ChunkStore, ModelFingerprint, StoreConfig  # noqa: E402
from tests.support.waits import returns  # noqa: E402

L, H, D, BS, NB, N = 2, 2, 32, 16, 12, 20  # N: tokens per chunk
ROPE = RopeSpec.from_hf_config({"hidden_size": 64, "num_attention_heads": 2, "head_dim": D, "rope_theta": 10000.0,
                                "max_position_embeddings": 4096, "model_type": "llama"})
FP = ModelFingerprint("Tiny", "w", "float32")
C0, C1 = context_signature(()), context_signature((b"x" * 16,))
ENTRY_BYTES = 2 * L * N * H * D * 4 + 2 * 8 * N  # K, V (fp32), token ids, positions


class GatedFit:
    """A real patch fit that blocks until released (a deliberately slow SVD); ``finished`` once it returns or
    gives up."""

    def __init__(self) -> None:
        self.started, self.release, self.finished = threading.Event(), threading.Event(), threading.Event()

    def __call__(self, dk, dv, **kw):
        self.started.set()
        try:
            assert self.release.wait(30), "test never released the fit"
            return fit_patch(dk, dv, max_rank=2, **kw)
        finally:
            self.finished.set()


def worker(store_cfg: StoreConfig | None = None, *, fidelity: str = "fast", fit=None) -> WorkerSide:
    cfg = ConnectorConfig(policy=PolicyConfig(fidelity=fidelity), store=store_cfg or StoreConfig(device_bytes=1 << 20))
    store = ChunkStore(cfg.store, FP, fit_patch=fit) if fit is not None else None
    w = WorkerSide(cfg, ROPE, FP, store=store)
    w.register({f"model.layers.{i}.self_attn.attn": torch.zeros(NB, H, BS, 2 * D) for i in range(L)}, "CPU_ATTN", H, D)
    return w


def chunk(seed: int) -> tuple[bytes, tuple[int, ...], torch.Tensor, torch.Tensor]:
    """(key, tokens, k, v) of a chunk; k is rotated at positions 0..N."""
    g = torch.Generator().manual_seed(seed)
    return (bytes([seed]) * 16, tuple(range(100 * seed, 100 * seed + N)), torch.randn(L, N, H, D, generator=g),
            torch.randn(L, N, H, D, generator=g))


def in_context(c, seed: int):
    """Chunk `c` as computed after other chunks: its K/V shifted by a low-rank residue."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(L, 1, H, D, generator=g)
    return c[0], c[1], c[2] + 0.3 * w, c[3] - 0.3 * w


def computed(w: WorkerSide, blocks: list[int], start: int, c, ctx: bytes) -> SaveItem:
    """Write chunk `c` into the cache as a forward pass at positions start..start+N would; its SaveItem."""
    key, toks, k, v = c
    slots = block_slots(blocks, BS, start, start + N)
    kk = relocate(k, torch.arange(N), torch.arange(start, start + N), ROPE)
    for i, name in enumerate(w.caches):
        scatter_kv(w.caches[name], w.spec, kk[i], v[i], slots)
    return SaveItem(key, toks, start, start + N, ctx, True)


def read(w: WorkerSide, blocks: list[int], start: int, n: int = N):
    slots = block_slots(blocks, BS, start, start + n)
    kv = [gather_kv(w.caches[name], w.spec, slots) for name in w.caches]
    return torch.stack([a for a, _ in kv]), torch.stack([b for _, b in kv])


def load(w: WorkerSide, *reqs: ReqLoad) -> None:
    w.start_load(KVReuseMetadata(loads=list(reqs)))
    for name in w.caches:
        w.load_layer(name)


def test_served_policy_labels_what_the_store_returned():
    assert [served_policy(p, "exact") for p in ("exact", "survival", "reorder", "blind")] == \
        ["exact", "survival", "reorder", "blind"]
    assert [served_policy(p, "patched") for p in ("exact", "survival", "reorder")] == ["recall", "recall", "reorder"]
    assert {served_policy(p, "base") for p in ("exact", "survival", "reorder", "blind")} == {"blind"}


def test_load_never_waits_on_a_pending_slow_fit_and_places_each_item_at_its_own_slots():
    fit = GatedFit()
    w = worker(fit=fit)
    a, b = chunk(1), chunk(2)
    w.save(KVReuseMetadata(saves=[ReqSave("r1", [3, 1], [computed(w, [3, 1], 5, a, C0)])]))
    w.store.flush()
    # r2 computes `a` again in another context (its patch fit now holds the store's thread) and a new chunk `b`
    blocks2 = [2, 4, 5, 6, 7, 8]
    save_a, save_b = computed(w, blocks2, 40, in_context(a, 2), C1), computed(w, blocks2, 60, b, C1)
    w.save(KVReuseMetadata(saves=[ReqSave("r2", blocks2, [save_a, save_b])]))
    assert fit.started.wait(10)
    try:
        # r3 places `a` at 10..30 and `b` (still queued behind the fit) at 50..70: two segments, a gap between
        blocks3 = [0, 9, 10, 11, 1]
        items = [LoadItem(a[0], a[1], 0, N, 10, C0, "exact"), LoadItem(b[0], b[1], 0, N, 50, C1, "exact")]
        returns(lambda: load(w, ReqLoad("r3", blocks3, items, fidelity="fast")))
        assert not fit.finished.is_set(), "the load waited for the store's background work"
        assert w.take_failed_blocks() == set()
        for (key, toks, k, v), start in ((a, 10), (b, 50)):
            gk, gv = read(w, blocks3, start)
            torch.testing.assert_close(gk, relocate(k, torch.arange(N), torch.arange(start, start + N), ROPE),
                                       atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(gv, v)
        gap_k, gap_v = read(w, blocks3, 30, 20)
        assert not gap_k.any() and not gap_v.any()  # nothing written between the two items
        s = w.take_stats()
        assert s.claims == {"exact": 2} and s.bytes_loaded.keys() == {"device", "ingest"}
    finally:
        fit.release.set()
    w.close()


@pytest.mark.parametrize("fidelity,claimed", [("fast", "exact"), ("exact", "exact"), ("fast", "survival"),
                                              ("accurate", "survival")])
def test_budget_too_small_for_the_context_serves_base_only_as_blind(fidelity, claimed):
    """Base KV served for a claim is blind: refused for an exact claim (vLLM caches those under plain block
    hashes) and for an exact request; placed for an approximate claim of a request that accepts it."""
    w = worker(StoreConfig(device_bytes=ENTRY_BYTES))  # room for the base KV, not for a context or patch
    a = chunk(3)
    w.save(KVReuseMetadata(saves=[ReqSave("r1", [3, 1], [computed(w, [3, 1], 5, a, C0)])]))
    w.store.flush()
    w.save(KVReuseMetadata(saves=[ReqSave("r2", [2, 4, 5, 6], [computed(w, [2, 4, 5, 6], 40, in_context(a, 1), C1)])]))
    w.store.flush()
    assert w.store.get(ChunkKey(a[0]), a[1], context=C1).how == "base"  # the context did not fit
    blocks = [0, 7, 8]
    # the scheduler recorded C1 when it planned the save: it claims the chunk as exact (or survival after it)
    load(w, ReqLoad("r3", blocks, [LoadItem(a[0], a[1], 0, N, 10, C1, claimed)], fidelity=fidelity))
    gk, gv = read(w, blocks, 10)
    s = w.take_stats()
    if claimed == "exact" or fidelity == "exact":
        assert w.take_failed_blocks() == {0, 7}  # recomputed by vLLM
        assert not gk.any() and not gv.any() and not s.claims  # nothing of the base KV was placed
        assert w.take_report().lost_keys == [a[0]]
    else:
        assert w.take_failed_blocks() == set() and s.claims == {"blind": 1}
        torch.testing.assert_close(gv, a[3])
    w.close()


def test_a_failed_load_saves_nothing_of_its_request_in_that_step():
    w = worker()
    a, b, c = chunk(4), chunk(5), chunk(9)
    missing = LoadItem(b"m" * 16, tuple(range(N)), 0, N, 0, C0, "exact")
    meta = KVReuseMetadata(loads=[ReqLoad("r", [0, 1, 2], [missing], fidelity="fast")],
                           saves=[ReqSave("r", [0, 1, 2], [computed(w, [0, 1, 2], 20, a, C1)]),
                                  ReqSave("q", [5, 6], [computed(w, [5, 6], 0, b, C0)]),
                                  # holds r's first block through vLLM's prefix cache: vLLM rolls it back too
                                  ReqSave("s", [0, 8, 9], [computed(w, [0, 8, 9], 20, c, C1)])])
    w.start_load(meta)
    w.finish_loads()
    w.save(meta)
    w.store.flush()
    assert w.store.contains(ChunkKey(a[0])) is None  # r's chunk attended to blocks the failed load never wrote
    assert w.store.contains(ChunkKey(c[0])) is None  # and so did s's
    assert w.store.contains(ChunkKey(b[0])) == "device"  # another request of the same step is saved
    rep = w.take_report()
    assert rep.unsaved_req_ids == ["r", "s"] and rep.lost_keys == [b"m" * 16]
    assert w.take_report() is None
    w.close()


def test_evictions_and_demotions_reach_the_report():
    w = worker(StoreConfig(device_bytes=2 * ENTRY_BYTES))
    cs = [chunk(s) for s in (6, 7, 8)]
    for i, c in enumerate(cs):
        w.save(KVReuseMetadata(saves=[ReqSave(f"r{i}", [2 * i, 2 * i + 1], [computed(w, [2 * i, 2 * i + 1], 0, c,
                                                                                      C0)])]))
    w.store.flush()
    assert w.take_report().lost_keys == [cs[0][0]]  # evicted, no lower tier: the directory must forget it
    w.close()
    w = worker()
    a = chunk(9)
    w.save(KVReuseMetadata(saves=[ReqSave("r1", [3, 1], [computed(w, [3, 1], 5, a, C0)])]))
    w.store.flush()
    w.save(KVReuseMetadata(saves=[ReqSave("r2", [2, 4, 5, 6], [computed(w, [2, 4, 5, 6], 40, in_context(a, 1), C1)])]))
    w.store.flush()
    assert w.store.demote(ChunkKey(a[0])) > 0
    rep = w.take_report()
    assert rep.demoted_keys == [a[0]] and rep.lost_keys == []
    w.close()


def test_store_stats_are_read_at_most_once_a_second():
    w = worker()
    a = chunk(10)
    w.save(KVReuseMetadata(saves=[ReqSave("r1", [3, 1], [computed(w, [3, 1], 5, a, C0)])]))
    w.store.flush()
    first = w.take_stats(now=100.0)
    assert first.store_entries == {"device": 1} and first.saved_chunks == 1
    assert first.store_pending_bytes == {"ingest": 0, "work": 0}  # flushed: the store has settled
    assert w.take_stats(now=100.5).store_entries == {}  # within the period: the store is not touched
    assert w.take_stats(now=101.2).store_entries == {"device": 1}
    w.close()


def test_per_step_calls_never_wait_for_the_store_lock(monkeypatch):
    # the store's thread holds its lock while it stores a chunk; a worker between two steps (stats, report)
    # must not wait for it: gauges are read at a later step, events when there are some
    w = worker()
    a, b = chunk(11), chunk(12)
    w.save(KVReuseMetadata(saves=[ReqSave("r1", [3, 1], [computed(w, [3, 1], 5, a, C0)])]))
    w.store.flush()
    tier, held, release = w.store.memory[0], threading.Event(), threading.Event()
    real_insert = tier.insert

    def insert(entry, nbytes=None):  # runs with the store's lock held
        held.set()
        assert release.wait(30), "test never released the insert"
        real_insert(entry, nbytes)

    monkeypatch.setattr(tier, "insert", insert)
    storing = threading.Thread(target=w.store.put, args=(ChunkEntry(ChunkKey(b[0]), torch.tensor(b[1]),
                                                                    torch.arange(N), b[2], b[3]),))
    storing.start()
    try:
        assert held.wait(30)
        s = returns(lambda: w.take_stats(now=200.0))
        assert returns(w.take_report) is None
        assert storing.is_alive()  # both returned while the store's lock was held
        assert s.store_entries == {} and s.saved_chunks == 1  # counters now, gauges later
    finally:
        release.set()
        storing.join(30)
    assert w.take_stats(now=200.1).store_entries == {"device": 2}  # the next step reads them
    w.close()


def test_stats_quiet_tells_whether_any_counter_moved_without_taking_them():
    """vLLM asks for the connector's stats twice a step: a step where nothing happened builds nothing."""
    w = worker()
    assert w.stats_quiet()
    a = chunk(60)
    w.save(KVReuseMetadata(saves=[ReqSave("r1", [1, 2], [computed(w, [1, 2], 4, a, C0)])]))
    assert not w.stats_quiet() and not w.stats_quiet()  # a check takes nothing
    assert w.take_stats().saved_chunks == 1
    assert w.stats_quiet()
    w.close()


def test_report_aggregates_over_workers():
    from kvreuse.connector.metadata import KVReuseWorkerReport

    a = KVReuseWorkerReport([b"1"], [b"d"], ["r"])
    m = a.aggregate(KVReuseWorkerReport([b"2"], [], ["r", "q"]))
    assert (m.lost_keys, m.demoted_keys, m.unsaved_req_ids) == ([b"1", b"2"], [b"d"], ["r", "q"])


def gated_gather(monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Make the worker's copy-out wait for the returned ``gate`` before it reads the cache; ``finished`` is set
    once a read has returned (or given up)."""
    import kvreuse.connector.worker as wm

    gate, finished, real = threading.Event(), threading.Event(), wm.gather

    def slow_gather(*args, **kw):
        try:
            assert gate.wait(30)
            return real(*args, **kw)
        finally:
            finished.set()

    monkeypatch.setattr(wm, "gather", slow_gather)
    return gate, finished


def test_an_asynchronous_copy_out_is_settled_before_the_next_step_writes(monkeypatch):
    """`save(wait=False)` (what the connector does at the end of a forward) returns before the copy; a step
    whose allocated blocks are unknown (metadata built outside vLLM's scheduler) waits for it in `start_load`;
    what was saved is then served.  A copy that fails is counted and reported lost."""
    import kvreuse.connector.worker as wm

    w = worker()
    a = chunk(30)
    item = computed(w, [1, 2], 4, a, C0)
    gate, finished = gated_gather(monkeypatch)
    returns(lambda: w.save(KVReuseMetadata(saves=[ReqSave("r1", [1, 2], [item])]), wait=False))
    assert not finished.is_set() and w.take_stats().saved_chunks == 0  # returned while the copy waits on the gate
    threading.Timer(0.2, gate.set).start()
    load(w, ReqLoad("r2", [5, 6], [LoadItem(a[0], a[1], 0, N, 9, C0, "exact")], fidelity="fast"))  # settles, then loads
    assert not w.take_failed_blocks()
    assert w.take_stats().saved_chunks == 1
    k, v = read(w, [5, 6], 9)
    torch.testing.assert_close(k, relocate(a[2], torch.arange(N), torch.arange(9, 9 + N), ROPE), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v, a[3])

    def broken(*args, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(wm, "gather", broken)
    b = chunk(31)
    w.save(KVReuseMetadata(saves=[ReqSave("r3", [3, 4], [computed(w, [3, 4], 0, b, C0)])]), wait=False)
    w.settle_saves()
    assert w.take_stats().dropped_saves == 1 and b[0] in w.take_report().lost_keys
    w.close()


def test_a_step_waits_only_for_copy_outs_reading_the_blocks_it_allocates(monkeypatch):
    """A copy-out still running at the next step's start is waited for only when that step allocates one of
    the blocks it reads (vLLM zeroes and writes those whole); a step that allocates other blocks goes on
    while it runs, and what it copied is then stored."""
    w = worker()
    a = chunk(40)
    gate, finished = gated_gather(monkeypatch)
    w.save(KVReuseMetadata(saves=[ReqSave("r1", [1, 2], [computed(w, [1, 2], 4, a, C0)])]), wait=False)
    returns(lambda: w.settle_saves([3, 7]))  # a step allocating blocks 3 and 7: the copy of blocks 1, 2 goes on
    returns(lambda: w.start_load(KVReuseMetadata(fresh_blocks=[5, 6])))
    assert not finished.is_set()  # both returned while the copy was held at its gate
    assert w.take_stats().saved_chunks == 0
    threading.Timer(0.3, gate.set).start()
    w.settle_saves([9, 2])  # block 2 allocated anew: waits for the copy
    assert finished.is_set() and w.take_stats().saved_chunks == 1
    gate.clear()
    finished.clear()
    b = chunk(41)
    w.save(KVReuseMetadata(saves=[ReqSave("r2", [3, 4], [computed(w, [3, 4], 0, b, C0)])]), wait=False)
    threading.Timer(0.3, gate.set).start()
    # a step loading the chunk still being copied waits for its own bytes (other blocks allocated)
    w.start_load(KVReuseMetadata(loads=[ReqLoad("r3", [5, 6], [LoadItem(b[0], b[1], 0, N, 9, C0, "exact")], fidelity="fast")],
                                 fresh_blocks=[5, 6]))
    assert finished.is_set()  # it returned only once the copy had read the cache
    w.finish_loads()
    assert not w.take_failed_blocks()
    k, v = read(w, [5, 6], 9)
    torch.testing.assert_close(v, b[3])
    w.close()


def test_a_copy_out_starts_with_the_next_step_or_after_the_gate_time(monkeypatch):
    """The end of a step is the engine's critical path (output back, next step planned and sent): a copy-out
    saved there starts only once the next step starts (`settle_saves`, run by `handle_preemptions`), or by
    itself `_COPY_GATE_S` after its save when no step comes."""
    import kvreuse.connector.worker as wm

    read_at: list[float] = []
    reading, hold, finished = threading.Event(), threading.Event(), threading.Event()
    real = wm.gather

    def held_gather(*args, **kw):  # the copy's read of the cache: recorded, then held until `hold`
        read_at.append(time.perf_counter())
        reading.set()
        try:
            assert hold.wait(30)
            return real(*args, **kw)
        finally:
            finished.set()

    monkeypatch.setattr(wm, "gather", held_gather)
    monkeypatch.setattr(wm, "_COPY_GATE_S", 300.0)  # past every wait below: here only a step starts the copy
    w = worker()
    a = chunk(50)
    w.save(KVReuseMetadata(saves=[ReqSave("r1", [1, 2], [computed(w, [1, 2], 4, a, C0)])]), wait=False)
    assert not reading.wait(0.3) and w.take_stats().saved_chunks == 0  # held at the gate: no step started yet
    returns(lambda: w.settle_saves([7]))  # the next step starts (allocating another block): the copy goes
    assert reading.wait(60), "the next step did not start the copy"
    assert not finished.is_set()  # settle_saves returned while the copy was still held: nothing waited for it
    hold.set()
    w.settle_saves()
    assert w.take_stats().saved_chunks == 1

    monkeypatch.setattr(wm, "_COPY_GATE_S", 0.2)  # no next step: the copy starts by itself
    b = chunk(51)
    read_at.clear()
    reading.clear()
    t0 = time.perf_counter()
    w.save(KVReuseMetadata(saves=[ReqSave("r2", [3, 4], [computed(w, [3, 4], 0, b, C0)])]), wait=False)
    assert reading.wait(60), "the copy never started by itself"
    assert read_at[0] - t0 >= 0.15  # not before the gate time (a lower bound: no busy machine breaks it)
    w.close()


def test_fresh_blocks_are_every_block_a_step_allocates():
    from types import SimpleNamespace

    from kvreuse.connector.scheduler import fresh_blocks

    out = SimpleNamespace(scheduled_new_reqs=[SimpleNamespace(block_ids=([4, 5], [9]))],
                          scheduled_cached_reqs=SimpleNamespace(new_block_ids=[None, ([7],), ([],)]),
                          new_block_ids_to_zero=[11])
    assert fresh_blocks(out) == [4, 5, 7, 9, 11]
    assert fresh_blocks(SimpleNamespace(scheduled_new_reqs=[], scheduled_cached_reqs=None)) == []
