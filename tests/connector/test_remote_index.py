"""The scheduler's view of the shared Redis tier is a local index refreshed in the background.

Real `redis-server`s; stores write entries the way workers do.  A lookup is a dict read: the
caller's thread makes no socket call, it answers with Redis stopped (within the TTL) and misses
after the TTL; evictions and removals leave the index on the next refresh; with tensor
parallelism a chunk is listed only when every rank stored it; the index is bounded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import time

import pytest

from kvreuse.connector.remote import RemoteLookup
from kvreuse.store import ChunkKey, ChunkStore, ModelFingerprint, StoreConfig
from kvreuse.store.persist import encode
from tests.store.conftest import FP, make_entry
from tests.support.redis_server import redis_server_or_skip


@pytest.fixture
def srv():
    s = redis_server_or_skip()
    try:
        yield s
    finally:
        s.close()


def _cfg(url: str, redis_bytes: int = 1 << 24) -> StoreConfig:
    return StoreConfig(redis_url=url, redis_bytes=redis_bytes)


@contextlib.contextmanager
def no_network_on_this_thread():
    """The block must make no socket call (connect, send, receive) on the calling thread; other threads may."""
    me, calls = threading.get_ident(), []

    def spy(name, real):
        def call(sock, *args, **kw):
            if threading.get_ident() == me:
                calls.append(name)
            return real(sock, *args, **kw)
        return call

    with pytest.MonkeyPatch.context() as mp:
        for name in ("connect", "connect_ex", "send", "sendall", "recv", "recv_into"):
            mp.setattr(socket.socket, name, spy(name, getattr(socket.socket, name)))
        yield
    assert not calls, f"socket calls on the caller's thread: {calls}"


def _wait_for(cond, what: str, guard_s: float = 30.0) -> None:
    """Poll ``cond`` until it holds (the guard only catches a hang; it bounds no speed)."""
    deadline = time.monotonic() + guard_s
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_lookup_reads_records_the_workers_wrote(srv):
    e = make_entry(1)
    e.preceding = {e.context: (b"a" * 16, b"b" * 16)}
    with ChunkStore(_cfg(srv.url), FP) as store:
        assert store.put(e)
        store.flush()
    remote = RemoteLookup(srv.url, 1 << 24, FP.digest, start=False)
    try:
        assert remote.lookup(e.key.digest) is None  # nothing read yet: a miss, not a network call
        assert remote.refresh()
        assert remote.lookup(e.key.digest) == (e.num_tokens, (e.context,))
        rec = remote.record(e.key.digest)
        assert rec.preceding == {e.context: (b"a" * 16, b"b" * 16)}
        assert remote.lookup(make_entry(2).key.digest) is None
        other = RemoteLookup(srv.url, 1 << 24, dataclasses.replace(FP, weights_id="w9").digest, start=False)
        assert other.refresh() and other.lookup(e.key.digest) is None  # another model sees nothing
        other.close()
    finally:
        remote.close()


def test_lookup_never_touches_the_network(srv):
    entries = [make_entry(s) for s in range(5)]
    with ChunkStore(_cfg(srv.url), FP) as store:
        for e in entries:
            store.put(e)
        store.flush()
    remote = RemoteLookup(srv.url, 1 << 24, FP.digest, refresh_seconds=0.05, ttl_seconds=3.0)
    try:
        _wait_for(lambda: remote.lookup(entries[0].key.digest) is not None,
                  "the background refresh never filled the index")
        with no_network_on_this_thread():  # the index is read on the scheduler's thread, never Redis
            assert all(remote.lookup(e.key.digest) is not None and remote.record(e.key.digest) is not None
                       for e in entries)
        srv.stop()
        with no_network_on_this_thread():  # Redis down, within the TTL: every lookup still answers, locally
            for _ in range(100):
                assert all(remote.lookup(e.key.digest) is not None for e in entries)
        # past the TTL with every refresh failing: the index no longer claims anything
        _wait_for(lambda: not remote.fresh, "the index stayed fresh with Redis down")
        with no_network_on_this_thread():
            assert all(remote.lookup(e.key.digest) is None for e in entries)
        assert remote.failed_refreshes > 0
        srv.start()  # same port, empty
        _wait_for(lambda: remote.fresh, "did not recover")
        assert remote.lookup(entries[0].key.digest) is None  # the restarted Redis is empty
    finally:
        remote.close()


def test_evictions_and_removals_leave_the_index(srv):
    one = len(encode(make_entry(0), FP.digest))
    with ChunkStore(_cfg(srv.url, redis_bytes=3 * one), FP) as store:
        remote = RemoteLookup(srv.url, 3 * one, FP.digest, start=False)
        try:
            entries = [make_entry(s) for s in range(6)]
            for e in entries:
                store.put(e)
                store.flush()
            assert remote.refresh()
            listed = [e for e in entries if remote.lookup(e.key.digest) is not None]
            held = [e for e in entries if store.redis.contains(e.key)]
            assert listed == held and len(held) == 3
            store.remove(held[0].key)
            assert remote.refresh() and remote.lookup(held[0].key.digest) is None
            assert len(remote) == 2
        finally:
            remote.close()


def test_tensor_parallel_chunks_are_listed_only_when_every_rank_stored_them(srv):
    r0 = ModelFingerprint("TestArch", "w", "bfloat16", tp_rank=0, tp_size=2)
    both, only0 = make_entry(1, model=r0), make_entry(2, model=r0)
    with ChunkStore(_cfg(srv.url), r0) as s0, ChunkStore(_cfg(srv.url), r0.for_rank(1)) as s1:
        for e in (both, only0):
            s0.put(e)
        s1.put(both)
        s0.flush(), s1.flush()
    remote = RemoteLookup(srv.url, 1 << 24, [f.digest for f in r0.all_ranks()], start=False)
    try:
        assert remote.refresh()
        assert remote.lookup(both.key.digest) is not None and remote.lookup(only0.key.digest) is None
    finally:
        remote.close()


def test_index_is_bounded(srv):
    with ChunkStore(_cfg(srv.url), FP) as store:
        for s in range(8):
            store.put(make_entry(s))
        store.flush()
    remote = RemoteLookup(srv.url, 1 << 24, FP.digest, max_entries=5, start=False)
    try:
        assert remote.refresh() and len(remote) == 5
        assert sum(remote.lookup(make_entry(s).key.digest) is not None for s in range(8)) == 5
    finally:
        remote.close()


def test_unreachable_redis_at_start_is_only_misses():
    with no_network_on_this_thread():  # connecting happens on the background thread
        remote = RemoteLookup("redis://127.0.0.1:1/0", 1 << 20, FP.digest, refresh_seconds=0.05)
    try:
        with no_network_on_this_thread():
            assert remote.lookup(ChunkKey.of(FP, [1, 2]).digest) is None
        _wait_for(lambda: remote.failed_refreshes > 0, "the background thread never tried Redis")
        assert remote.lookup(ChunkKey.of(FP, [1, 2]).digest) is None
    finally:
        remote.close()
