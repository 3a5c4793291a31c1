"""Lower-tier hits load layer by layer, shared by concurrent lookups; demotion keeps base + patch."""

from __future__ import annotations

import functools
import threading
import time

import pytest
import torch

from kvreuse.patch import fit_patch
from kvreuse.store import ChunkLoadError, ChunkStore, StoreConfig
from tests.store.conftest import FP, make_entry
from tests.support.waits import returns


class GatedReader:
    """Wraps a tier reader: reads past layer 0 wait until ``gate`` is set."""

    def __init__(self, inner, gate: threading.Event) -> None:
        self.inner, self.gate, self.header = inner, gate, inner.header
        h = inner.header
        self.layer1 = h.payload_offset + h.segments["k.1"].offset

    def read(self, offset: int, n: int) -> bytes:
        if offset >= self.layer1:
            assert self.gate.wait(30)
        return self.inner.read(offset, n)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def gated_store(tmp_path):
    e = make_entry(11, layers=4, tokens=16)
    store = ChunkStore(StoreConfig(host_bytes=1 << 20, disk_path=str(tmp_path), disk_bytes=1 << 20), FP)
    store.put(e)
    assert store.evict(e.key) and store.contains(e.key) == "disk"
    gate, opened = threading.Event(), []
    real_open = store.disk.open

    def open_gated(key):
        opened.append(key)
        r = real_open(key)
        return None if r is None else GatedReader(r, gate)

    store.disk.open = open_gated
    yield store, e, gate, opened
    gate.set()
    store.close()


def test_first_layer_is_usable_before_the_last_arrives(gated_store):
    store, e, gate, _ = gated_store
    h = store.fetch(e.key, e.token_ids)
    assert h.source == "disk" and torch.equal(h.positions, e.positions)
    k0, v0 = h.layer(0, timeout=30)
    assert torch.equal(k0, e.k[0]) and torch.equal(v0, e.v[0])
    assert not h.done()
    with pytest.raises(TimeoutError):
        h.layer(1, timeout=0.2)
    gate.set()
    for i in range(4):
        k, v = h.layer(i, timeout=30)
        assert torch.equal(k, e.k[i]) and torch.equal(v, e.v[i])
    assert torch.equal(h.result(30).k, e.k)
    store.flush()
    assert store.contains(e.key) == "host" and store.stats.rehydrations == 1


def test_concurrent_lookups_share_one_rehydration(gated_store):
    store, e, gate, opened = gated_store
    handles, barrier = [], threading.Barrier(8)

    def look():
        barrier.wait()
        handles.append(store.fetch(e.key, e.token_ids))

    threads = [threading.Thread(target=look) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(handles) == 8 and all(h is handles[0] for h in handles)
    gate.set()
    assert torch.equal(handles[0].result(30).v, e.v)
    store.flush()
    assert len(opened) == 1
    assert store.stats.rehydrations == 1 and store.stats.shared_rehydrations == 7
    assert store.memory[0].used_bytes == e.nbytes


def test_a_failed_load_raises_from_the_handle_and_is_a_miss_for_get(tmp_path):
    e = make_entry(12, layers=4, tokens=16)
    with ChunkStore(StoreConfig(host_bytes=1 << 20, disk_path=str(tmp_path), disk_bytes=1 << 20), FP) as store:
        store.put(e)
        store.evict(e.key)
        path = store.disk.path(e.key)
        data = bytearray(open(path, "rb").read())
        data[-3] ^= 0xFF  # last layer's V
        open(path, "wb").write(bytes(data))
        h = store.fetch(e.key, e.token_ids)
        try:  # layer 0 is intact, but once the load has failed every layer raises: the whole load is void
            assert torch.equal(h.layer(0, timeout=30)[0], e.k[0])
        except ChunkLoadError:
            pass
        with pytest.raises(ChunkLoadError):
            h.layer(3, timeout=30)
        with pytest.raises(ChunkLoadError):
            h.result(30)
        store.flush()
        assert store.memory[0].used_bytes == 0 and not store.memory[0].reserved  # reservation released
        assert store.get(e.key, e.token_ids) is None and store.contains(e.key) is None


def _in_context(e, seed=0):
    g = torch.Generator().manual_seed(seed)
    # a rank-1 residue per layer, as a context would leave
    u = torch.randn(e.num_layers, e.num_tokens, 1, 1, generator=g)
    w = torch.randn(e.num_layers, 1, e.num_kv_heads, e.head_dim, generator=g)
    return (e.k.float() + 0.3 * u * w).to(e.k.dtype), (e.v.float() - 0.2 * u * w).to(e.v.dtype)


def test_pressure_demotes_before_it_evicts(tmp_path):
    a, b = make_entry(21, layers=3, tokens=32), make_entry(22, layers=3, tokens=32)
    ck, cv = _in_context(a)
    budget = 2 * a.nbytes + a.k.nbytes  # a, its in-context KV and b do not all fit
    # demotion mechanics: an unbudgeted fit, so the patch can restore all of the rank-1 residue
    # (fit_patch's default 5% byte budget would, by design, spend these tiny entries' bytes on V only)
    fit = functools.partial(fit_patch, budget=None)
    cfg = StoreConfig(device_bytes=budget, disk_path=str(tmp_path), disk_bytes=1 << 20)
    with ChunkStore(cfg, FP, fit_patch=fit) as store:
        store.put(a)
        assert store.add_context_kv(a.key, b"ctx", ck, cv)
        full = store.memory[0].entries[a.key].nbytes
        store.put(b)  # pressure: a's in-context KV becomes a patch; nothing is evicted
        s = store.snapshot_stats()
        assert s.demotions == 1 and s.tiers["device"].evictions == 0
        ea = store.memory[0].entries[a.key]
        assert not ea.in_context and b"ctx" in ea.patches and ea.nbytes < full
        view = store.get(a.key, a.token_ids, context=b"ctx")
        assert view.how == "patched"
        err = (view.k.float() - ck.float()).norm() / (ck.float() - a.k.float()).norm()
        assert err < 0.05  # the patch restores the in-context KV up to bf16 rounding
        part = store.get(a.key, a.token_ids, context=b"ctx", tokens=slice(5, 9), layers=slice(1, 3))
        assert torch.equal(part.k, view.k[1:3, 5:9]) and torch.equal(part.positions, a.positions[5:9])
        base = store.get(a.key, a.token_ids, context=b"elsewhere")
        assert base.how == "base" and torch.equal(base.k, a.k)
        # the patch survives a trip through the disk
        store.evict(a.key)
        again = store.get(a.key, a.token_ids, context=b"ctx", timeout=30)
        assert again.how == "patched" and torch.equal(again.k, view.k) and torch.equal(again.v, view.v)
        assert store.stats.hits_by_policy == {"patched": 3, "base": 1}


def test_a_load_blocked_past_its_timeout_is_a_miss_then_lands(gated_store):
    """A disk read that does not return: the lookup gives up after its timeout (a counted miss) while the
    read is still blocked, the load goes on, and once the read returns the entry is in memory for the next
    lookup."""
    store, e, gate, opened = gated_store
    t0 = time.monotonic()
    assert returns(lambda: store.get(e.key, e.token_ids, timeout=0.3)) is None
    assert time.monotonic() - t0 >= 0.3  # it waited its timeout for the load (a lower bound: no busy machine breaks it)
    assert store.stats.load_timeouts == 1 and store.stats.failed_loads == 0
    h = store.fetch(e.key, e.token_ids)  # the load it gave up on, still under way: joined, not started again
    assert not h.done() and opened == [e.key] and store.stats.shared_rehydrations == 1
    gate.set()
    store.flush()
    assert store.contains(e.key) == "host"
    assert torch.equal(store.get(e.key, e.token_ids, timeout=0).k, e.k)
