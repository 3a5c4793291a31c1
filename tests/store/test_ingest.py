"""ChunkStore.ingest: one call per saved chunk, off the caller's thread, bounded, never under the lookup lock."""

from __future__ import annotations

import functools
import threading

import pytest
import torch

from kvreuse import fit_patch
from kvreuse.ops import relocate
from kvreuse.rope.spec import RopeSpec
from kvreuse.store import ChunkKey, ChunkStore, StoreConfig
from tests.store.conftest import FP, make_entry
from tests.support.waits import returns

ROPE = RopeSpec.from_hf_config({"hidden_size": 64, "num_attention_heads": 4, "head_dim": 16, "rope_theta": 10000.0,
                                "max_position_embeddings": 4096, "model_type": "llama"})


class GatedFit:
    """A real patch fit that first blocks until released (a deliberately slow SVD); ``finished`` once it returns
    or gives up."""

    def __init__(self) -> None:
        self.started, self.release, self.finished, self.calls = (threading.Event(), threading.Event(),
                                                                 threading.Event(), 0)

    def __call__(self, dk, dv, **kw):
        self.calls += 1
        self.started.set()
        try:
            assert self.release.wait(30), "test never released the fit"
            return fit_patch(dk, dv, max_rank=2, budget=None, **kw)
        finally:
            self.finished.set()


def _ingest(store: ChunkStore, e, *, context=b"isolated", shift: int = 0, k=None, v=None) -> bool:
    """Hand over `e`'s chunk as computed at positions shifted by `shift` (keys rotated accordingly)."""
    pos = e.positions + shift
    k = relocate(e.k, e.positions, pos, ROPE) if k is None else k
    return store.ingest(e.key, e.token_ids, pos, k.clone(), (e.v if v is None else v).clone(), context, rope=ROPE)


def _stored_in_context(store: ChunkStore, e, context: bytes, k, v, shift: int = 0) -> None:
    """Store `e`'s chunk, then the same chunk computed in `context` (`k`, `v`, at positions shifted by `shift`)."""
    assert _ingest(store, e)
    store.flush()
    assert _ingest(store, e, context=context, shift=shift, k=k, v=v)
    store.flush()


def _in_context(e, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(e.num_layers, 1, e.num_kv_heads, e.head_dim, generator=g)
    return (e.k.float() + 0.2 * w).to(e.k.dtype), (e.v.float() - 0.2 * w).to(e.v.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_new_context_is_kept_as_computed_in_its_own_frame(dtype):
    """In-context KV computed at other positions than the entry's is read back bit for bit at those positions (an
    exact claim places it unrotated); its patch is fitted in the entry's frame and serves other positions."""
    e = make_entry(1, layers=2, tokens=12, heads=4, dim=16, dtype=dtype)
    ck, cv = _in_context(e, 5)
    ck40 = relocate(ck, e.positions, e.positions + 40, ROPE)  # the chunk computed 40 positions later, elsewhere
    with ChunkStore(StoreConfig(device_bytes=1 << 20), FP, fit_patch=functools.partial(fit_patch, budget=None)) as st:
        _stored_in_context(st, e, b"ctx-A", ck40, cv, shift=40)
        exact = st.get(e.key, e.token_ids, context=b"ctx-A")
        assert exact.how == "exact" and torch.equal(exact.positions, e.positions + 40)
        assert torch.equal(exact.k, ck40) and torch.equal(exact.v, cv)   # as computed: no rounding in between
        s = st.snapshot_stats()
        assert (s.ingests, s.ingested_entries, s.ingested_contexts, s.captured_patches) == (2, 1, 1, 1)
        st.demote(e.key)  # the context keeps its patch: served patched, in the entry's frame
        patched = st.get(e.key, e.token_ids, context=b"ctx-A")
        assert patched.how == "patched" and torch.equal(patched.positions, e.positions)
        assert st.take_events().demoted == [e.key]


@pytest.mark.parametrize("room", [0, 8 * 12])  # bytes of budget beyond the base and the context's K and V
def test_a_context_in_its_own_frame_is_held_within_the_budget(room):
    """The frame kept beside a context's KV counts against the tier's budget: with no room for it the context
    is not added (nothing raises, the budget holds); with room it is."""
    e = make_entry(2, layers=2, tokens=12, heads=4, dim=16, dtype=torch.float32)
    ck, cv = _in_context(e, 3)
    budget = e.nbytes + 2 * ck.numel() * ck.element_size() + room
    with ChunkStore(StoreConfig(device_bytes=budget), FP, fit_patch=None) as st:
        _stored_in_context(st, e, b"ctx-A", relocate(ck, e.positions, e.positions + 40, ROPE), cv, shift=40)
        s = st.snapshot_stats()
        assert s.failed_ingests == 0
        tier = st.memory[0]
        assert tier.used_bytes <= tier.budget_bytes
        view = st.get(e.key, e.token_ids, context=b"ctx-A")
        assert view.how == ("exact" if room else "base")


class CountingFit:
    """`fit_patch` (full rank, no budget), counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, dk, dv, **kw):
        self.calls += 1
        return fit_patch(dk, dv, budget=None, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_without_capture_a_patch_is_fitted_when_demotion_drops_the_kv_in_its_own_frame(dtype):
    """capture_patches=False: no fit while the context's KV is held (a patch is read only in its place); demotion
    fits it, the KV computed 40 positions later relocated into the entry's frame first, and the context then
    reads patched exactly as a patch captured at ingest reads."""
    e = make_entry(8, layers=2, tokens=12, heads=4, dim=16, dtype=dtype)
    ck, cv = _in_context(e, 7)
    ck40 = relocate(ck, e.positions, e.positions + 40, ROPE)
    views = {}
    for capture in (True, False):
        fit = CountingFit()
        with ChunkStore(StoreConfig(device_bytes=1 << 20), FP, fit_patch=fit, capture_patches=capture) as st:
            _stored_in_context(st, e, b"ctx-A", ck40, cv, shift=40)
            exact = st.get(e.key, e.token_ids, context=b"ctx-A")
            assert exact.how == "exact" and torch.equal(exact.k, ck40)
            assert fit.calls == (1 if capture else 0)
            st.demote(e.key)
            st.flush()
            assert fit.calls == 1
            views[capture] = st.get(e.key, e.token_ids, context=b"ctx-A")
            assert st.snapshot_stats().failed_fits == 0
    assert views[False].how == views[True].how == "patched"
    assert torch.equal(views[False].positions, e.positions)
    assert torch.equal(views[False].k, views[True].k) and torch.equal(views[False].v, views[True].v)


def test_a_demoted_context_in_its_own_frame_is_served_there_until_its_patch_is_fitted():
    """While demotion fits the patch of KV computed 40 positions later, that KV is served as computed, at those
    positions (an exact claim places it unrotated), never relabelled into the entry's frame."""
    e = make_entry(10, layers=2, tokens=12, heads=4, dim=16, dtype=torch.float32)
    ck, cv = _in_context(e, 6)
    ck40 = relocate(ck, e.positions, e.positions + 40, ROPE)
    fit = GatedFit()
    with ChunkStore(StoreConfig(device_bytes=1 << 20), FP, fit_patch=fit, capture_patches=False) as st:
        _stored_in_context(st, e, b"ctx", ck40, cv, shift=40)
        demoting = threading.Thread(target=st.demote, args=(e.key,))
        demoting.start()
        try:
            assert fit.started.wait(10)
            view = st.get(e.key, e.token_ids, context=b"ctx")
            assert (view.how, view.source) == ("exact", "demoting")
            assert torch.equal(view.positions, e.positions + 40) and torch.equal(view.k, ck40)
        finally:
            fit.release.set()
            demoting.join(10)
        view = st.get(e.key, e.token_ids, context=b"ctx")
        assert view.how == "patched" and torch.equal(view.positions, e.positions)


def test_without_capture_a_store_under_pressure_fits_new_contexts_at_once():
    """capture_patches=False: once the store has demoted (memory pressure), a new context's patch is fitted as it
    is ingested, its KV still kept; with no demotion over the last PRESSURE_WINDOW new contexts, fits wait again."""
    from kvreuse.store.ingest import PRESSURE_WINDOW

    b = make_entry(12, layers=2, tokens=12, heads=4, dim=16, dtype=torch.float32)
    fit = CountingFit()
    with ChunkStore(StoreConfig(device_bytes=4 << 20), FP, fit_patch=fit, capture_patches=False) as st:
        assert _ingest(st, b)
        st.flush()
        ck, cv = _in_context(b, 1)
        assert _ingest(st, b, context=b"before", k=ck, v=cv)
        st.flush()
        assert fit.calls == 0
        st.demote(b.key)  # fits "before"
        st.flush()
        assert fit.calls == 1 and st.snapshot_stats().demotions == 1
        assert _ingest(st, b, context=b"after", k=ck, v=cv)
        st.flush()
        assert fit.calls == 2  # fitted at ingest
        assert st.get(b.key, b.token_ids, context=b"after").how == "exact"  # its KV is still what is read
        for i in range(PRESSURE_WINDOW):
            assert _ingest(st, b, context=b"later-%d" % i, k=ck, v=cv)
        st.flush()
        calls = fit.calls
        assert _ingest(st, b, context=b"calm", k=ck, v=cv)
        st.flush()
        assert fit.calls == calls  # no demotion over the window: back to fitting at demotion


def test_without_capture_a_context_whose_kv_finds_no_room_is_fitted_at_once():
    """capture_patches=False and a budget that holds the base and a patch but not the context's KV: the patch,
    fitted at ingest, is what the store keeps of that context."""
    e = make_entry(9, layers=2, tokens=12, heads=4, dim=16, dtype=torch.float32)
    ck, cv = _in_context(e, 4)
    fit = CountingFit()
    budget = e.nbytes + ck.numel() * ck.element_size()  # room for half of the context's K and V
    with ChunkStore(StoreConfig(device_bytes=budget), FP, fit_patch=functools.partial(fit, max_rank=1),
                    capture_patches=False) as st:
        _stored_in_context(st, e, b"ctx-A", ck, cv)
        assert fit.calls == 1
        assert st.get(e.key, e.token_ids, context=b"ctx-A").how == "patched"
        assert st.memory[0].used_bytes <= budget


def test_lookups_never_wait_on_a_slow_fit_nor_take_a_lock_it_holds():
    a, b = (make_entry(s, layers=2, tokens=12, heads=4, dim=16, dtype=torch.float32) for s in (2, 3))
    fit = GatedFit()
    with ChunkStore(StoreConfig(device_bytes=1 << 20), FP, fit_patch=fit) as st:
        assert _ingest(st, a)
        st.flush()
        ck, cv = _in_context(a, 7)
        assert _ingest(st, a, context=b"ctx", k=ck, v=cv)  # a new context: its patch fit blocks the thread
        assert fit.started.wait(10)
        assert _ingest(st, b)  # queued behind the blocked fit
        try:  # each lookup returns while the fit still holds the store's thread
            view = returns(lambda: st.get(a.key, a.token_ids, context=b"isolated"))
            assert view is not None and view.how == "exact"
            queued = returns(lambda: st.get(b.key, b.token_ids))  # served from the bytes handed over
            assert queued is not None and queued.source == "ingest" and torch.equal(queued.k, b.k)
            assert returns(lambda: st.contains(b.key, b.token_ids)) == "ingest"
            assert returns(lambda: st.get(b.key, b.token_ids, context=b"elsewhere")).how == "base"
            assert not fit.finished.is_set()
        finally:
            fit.release.set()
        st.flush()
        assert st.contains(b.key) == "device" and st.get(a.key, a.token_ids, context=b"ctx").how == "exact"


def test_a_context_still_queued_for_ingest_is_served_its_own_kv_never_base():
    # The scheduler records a context when it plans the save; the next request claims it at once.  The store
    # must serve what it was handed (exact) while the context's patch is being fitted, not the base KV.
    e = make_entry(5, layers=2, tokens=12, heads=4, dim=16, dtype=torch.float32)
    fit = GatedFit()
    with ChunkStore(StoreConfig(device_bytes=1 << 20), FP, fit_patch=fit) as st:
        assert _ingest(st, e)
        st.flush()
        (ak, av), (bk, bv) = _in_context(e, 1), _in_context(e, 2)
        assert _ingest(st, e, context=b"ctx-A", shift=40, k=relocate(ak, e.positions, e.positions + 40, ROPE), v=av)
        assert fit.started.wait(10)  # ctx-A is being fitted; ctx-B queued behind it
        assert _ingest(st, e, context=b"ctx-B", shift=80, k=relocate(bk, e.positions, e.positions + 80, ROPE), v=bv)
        try:
            for ctx, shift, ck, cv in ((b"ctx-A", 40, ak, av), (b"ctx-B", 80, bk, bv)):
                view = st.get(e.key, e.token_ids, context=ctx, tokens=slice(2, 9))
                assert (view.how, view.source) == ("exact", "ingest")
                assert torch.equal(view.positions, e.positions[2:9] + shift)  # the frame it was computed in
                torch.testing.assert_close(relocate(view.k, view.positions, e.positions[2:9], ROPE), ck[:, 2:9],
                                           atol=1e-5, rtol=1e-5)
                assert torch.equal(view.v, cv[:, 2:9])
            assert st.get(e.key, e.token_ids, context=b"ctx-C").how == "base"  # never handed over
            assert st.pending_bytes()["ingest"] == 2 * 2 * ak.numel() * ak.element_size()  # both contexts' K and V
        finally:
            fit.release.set()
        st.flush()
        for ctx, shift in ((b"ctx-A", 40), (b"ctx-B", 80)):  # stored in the frame it was computed in
            view = st.get(e.key, e.token_ids, context=ctx)
            assert (view.how, view.source) == ("exact", "device") and torch.equal(view.positions, e.positions + shift)
        assert st.pending_bytes() == {"ingest": 0, "work": 0}  # nothing handed over is held any more


@pytest.mark.parametrize("outcome", ["fitted", "failed"])
def test_a_demoted_context_is_served_its_kv_until_its_patch_is_fitted(outcome):
    # Without a patch captured at ingest, demotion drops the context's KV and fits its patch later: until the
    # patch is published the context reads as its own KV; a failed fit leaves base KV, labelled as such.
    e = make_entry(6, layers=2, tokens=12, heads=4, dim=16, dtype=torch.float32)
    ck, cv = _in_context(e, 3)
    fit = GatedFit() if outcome == "fitted" else FailingFit()
    with ChunkStore(StoreConfig(device_bytes=1 << 20), FP, fit_patch=fit, capture_patches=False) as st:
        _stored_in_context(st, e, b"ctx", ck, cv)
        assert st.get(e.key, e.token_ids, context=b"ctx").how == "exact"
        demoting = threading.Thread(target=st.demote, args=(e.key,))  # fits on the demoting thread
        demoting.start()
        try:
            assert fit.started.wait(10)
            view = st.get(e.key, e.token_ids, context=b"ctx")
            assert (view.how, view.source) == ("exact", "demoting") and torch.equal(view.k, ck)
            assert st.snapshot_stats().demotions == 1 and st.take_events().demoted == [e.key]
        finally:
            fit.release.set()
            demoting.join(10)
        view = st.get(e.key, e.token_ids, context=b"ctx")
        assert (view.how, view.source) == (("patched", "device") if outcome == "fitted" else ("base", "device"))
        assert st.tiers.fitting == {}


class FailingFit(GatedFit):
    """A fit that blocks until released, then fails as a non-finite residue would."""

    def __call__(self, dk, dv, **kw):
        self.started.set()
        assert self.release.wait(30), "test never released the fit"
        raise ValueError("non-finite KV")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_ingest_under_overload_is_bounded_and_counts_drops():
    bound = 8 << 20
    fit = GatedFit()
    with ChunkStore(StoreConfig(device_bytes=64 << 20), FP, fit_patch=fit, ingest_bytes=bound) as st:
        first = make_entry(4, layers=2, tokens=12, heads=4, dim=16, dtype=torch.float32)
        assert _ingest(st, first)
        st.flush()
        assert _ingest(st, first, context=b"ctx")  # blocks the ingest thread in its fit
        assert fit.started.wait(10)
        rss0 = _rss_bytes()
        offered, accepted, worst = 200, 0, 0
        try:
            for i in range(offered):  # 200 chunks of 1 MiB of KV each, nothing drains them
                k = torch.full((4, 256, 4, 64), float(i))  # [L, N, H, D] fp32: 1 MiB, v the same
                ids = torch.arange(256) + 1000 * i
                # a full queue refuses at once: the call returns while the fit still holds the store's thread
                accepted += returns(lambda: st.ingest(ChunkKey.of(FP, ids), ids, torch.arange(256), k, k.clone(),
                                                      rope=ROPE))
                worst = max(worst, st.pending_ingest_bytes())
            assert not fit.finished.is_set()
            grown = _rss_bytes() - rss0
        finally:
            fit.release.set()
        assert worst <= bound and 0 < accepted <= bound // (2 << 20)
        assert grown < 64 << 20, f"resident memory grew {grown >> 20} MiB while {offered * 2} MiB was offered"
        st.flush()
        s = st.snapshot_stats()
        assert s.dropped_ingests == offered - accepted and s.ingested_entries == 1 + accepted
        assert len(st.take_events().evicted) == offered - accepted  # dropped new keys: the scheduler forgets them


def test_evicted_keys_are_reported_spilled_keys_are_not(tmp_path):
    es = [make_entry(s, layers=2, tokens=8) for s in range(10, 13)]
    one = es[0].nbytes
    with ChunkStore(StoreConfig(device_bytes=2 * one), FP) as st:  # no tier below: the first one is gone
        for e in es:
            assert _ingest(st, e, k=e.k)
        st.flush()
        assert st.take_events().evicted == [es[0].key] and st.contains(es[0].key) is None
        assert st.take_events().evicted == []  # reported once
    with ChunkStore(StoreConfig(device_bytes=2 * one, disk_path=str(tmp_path), disk_bytes=1 << 20), FP) as st:
        for e in es:
            assert _ingest(st, e, k=e.k)
        st.flush()
        assert st.take_events().evicted == [] and st.contains(es[0].key) == "disk"


def test_ingest_many_queues_a_request_at_once_and_splits_what_does_not_fit_together():
    """One request's chunks go over as one queue item; when they do not fit the ingest bound together, each
    chunk that fits alone is queued and the rest are dropped, counted and reported lost."""
    from kvreuse.store.ingest import IngestChunk

    bound = 5 << 20
    fit = GatedFit()
    with ChunkStore(StoreConfig(device_bytes=64 << 20), FP, fit_patch=fit, ingest_bytes=bound) as st:

        def chunks(base: int, n: int) -> list[IngestChunk]:
            out = []
            for i in range(base, base + n):  # 2 MiB of KV each
                k = torch.full((4, 256, 4, 64), float(i))
                ids = torch.arange(256) + 1000 * i
                out.append(IngestChunk(ChunkKey.of(FP, ids), ids, torch.arange(256), k, k.clone(), b"isolated"))
            return out

        assert st.ingest_many(chunks(0, 2), rope=ROPE) == [True, True]  # 4 MiB: one item
        st.flush()
        assert st.snapshot_stats().ingested_entries == 2
        first = make_entry(4, layers=2, tokens=12, heads=4, dim=16, dtype=torch.float32)
        assert _ingest(st, first)
        st.flush()
        assert _ingest(st, first, context=b"ctx")  # the ingest thread waits in this fit from here
        assert fit.started.wait(10)
        try:
            ok = st.ingest_many(chunks(10, 3), rope=ROPE)  # 6 MiB > the bound: two fit alone, one does not
        finally:
            fit.release.set()
        assert ok == [True, True, False]
        st.flush()
        s = st.snapshot_stats()
        assert s.dropped_ingests == 1 and s.ingested_entries == 2 + 1 + 2
        assert [k.digest for k in st.take_events().evicted] == [chunks(12, 1)[0].key.digest]
