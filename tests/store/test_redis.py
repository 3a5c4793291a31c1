"""The Redis tier: shared by processes, budget shared, outages are misses, reconnects when back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import torch

from kvreuse.store import ChunkStore, StoreConfig
from tests.store.conftest import FP, OTHER_FP, make_entry
from tests.store.test_budgets import check_budgets

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PEER = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from kvreuse.store import ChunkStore, StoreConfig
    from tests.store.conftest import FP, make_entry
    url, mode, seeds = sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3].split(",")]
    with ChunkStore(StoreConfig(host_bytes=1 << 20, redis_url=url, redis_bytes=1 << 24), FP) as store:
        for s in seeds:
            e = make_entry(s)
            if mode == "put":
                assert store.put(e)
            else:
                v = store.get(e.key, e.token_ids, timeout=30)
                assert v is not None and torch.equal(v.k, e.k) and torch.equal(v.v, e.v), s
                print("got", s, flush=True)
""")


def _peer(url: str, mode: str, seeds: list[int]) -> str:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", PEER, url, mode, ",".join(map(str, seeds))], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _cfg(url: str, **kw) -> StoreConfig:
    return StoreConfig(redis_url=url, redis_bytes=kw.pop("redis_bytes", 1 << 24), **kw)


def test_two_processes_share_entries(redis_server):
    # another process publishes; this one reads
    _peer(redis_server.url, "put", [1, 2, 3])
    with ChunkStore(_cfg(redis_server.url, host_bytes=1 << 20), FP) as store:
        for s in (1, 2, 3):
            e = make_entry(s)
            assert store.contains(e.key, e.token_ids) == "redis"
            h = store.fetch(e.key, e.token_ids)
            assert h.source == "redis"
            assert torch.equal(h.layer(0)[0], e.k[0]) and torch.equal(h.result(30).v, e.v)
            assert store.contains(e.key) == "host"  # promoted into memory
        # this one publishes; another process reads
        for s in (4, 5):
            store.put(make_entry(s))
        store.flush()
    assert _peer(redis_server.url, "get", [4, 5, 1]).split() == ["got", "4", "got", "5", "got", "1"]


def test_token_mismatch_is_a_counted_miss(redis_server):
    with ChunkStore(_cfg(redis_server.url), FP) as store:
        e = make_entry(9)
        store.put(e)
        store.flush()
        wrong = e.token_ids.clone()
        wrong[0] += 1
        assert store.get(e.key, wrong) is None and store.contains(e.key, wrong) is None
        assert store.stats.token_mismatches == 1
        assert store.get(e.key, e.token_ids) is not None


def test_redis_outage_is_misses_then_reconnects(redis_server):
    e1, e2 = make_entry(1), make_entry(2)
    with ChunkStore(_cfg(redis_server.url), FP) as store:
        store.redis.retry_seconds = 0.2
        assert store.put(e1)
        store.flush()
        redis_server.stop()
        t0 = time.monotonic()
        assert store.get(e1.key, e1.token_ids) is None  # a miss, not an exception
        store.put(e2)  # writes are dropped quietly
        store.flush()
        assert store.contains(e2.key) is None
        for _ in range(20):
            assert store.get(e2.key, e2.token_ids) is None
        assert time.monotonic() - t0 < 10, "an outage must not stall lookups"
        errors = store.snapshot_stats().tiers["redis"].errors
        assert errors >= 1
        redis_server.start()  # same port, empty
        deadline = time.monotonic() + 10
        while True:  # the first attempts may fall in the back-off window
            store.put(e1)
            store.flush()
            if store.contains(e1.key) == "redis":
                break
            assert time.monotonic() < deadline, "did not reconnect"
            time.sleep(0.1)
        v = store.get(e1.key, e1.token_ids, timeout=30)
        assert v is not None and torch.equal(v.k, e1.k)
        check_budgets(store)


def test_budget_is_shared_by_concurrent_stores(redis_server):
    one = len(__import__("kvreuse.store.persist", fromlist=["encode"]).encode(make_entry(0), FP.digest))
    cfg = _cfg(redis_server.url, redis_bytes=5 * one)
    with ChunkStore(cfg, FP) as a, ChunkStore(cfg, FP) as b:
        for s in range(30):
            (a if s % 2 else b).put(make_entry(s))
            a.flush(), b.flush()
            check_budgets(a)
        assert a.redis.used_bytes() <= 5 * one
        assert a.snapshot_stats().tiers["redis"].evictions + b.snapshot_stats().tiers["redis"].evictions >= 24


def test_other_model_entries_in_redis_are_not_served(redis_server):
    e = make_entry(3, model=OTHER_FP)
    with ChunkStore(_cfg(redis_server.url), OTHER_FP) as theirs:
        theirs.put(e)
        theirs.flush()
    with ChunkStore(_cfg(redis_server.url), FP) as ours:
        # even asked for the exact key, the header's fingerprint refuses it
        assert ours.get(e.key, e.token_ids) is None and ours.contains(e.key) is None


def test_contexts_gained_later_are_republished_coalesced_off_the_callers_thread(redis_server):
    """Contexts added after the first publish reach Redis; while Redis is stopped, adding them costs the
    caller no wait, and replaces of one key that wait together are one write."""
    e = make_entry(7)
    with ChunkStore(_cfg(redis_server.url, host_bytes=1 << 22), FP) as store:
        assert store.put(e)
        store.flush()
        os.kill(redis_server.proc.pid, signal.SIGSTOP)  # the writer's next call waits on Redis
        try:
            t0 = time.monotonic()
            for j in range(3):
                assert store.add_context_kv(e.key, f"ctx{j}".encode(), e.k + j + 1, e.v + j + 1)
            assert time.monotonic() - t0 < 1.0
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        store.flush()
        assert store.stats.tier("redis").puts <= 3  # the first put, then at most two replaces for three contexts
    with ChunkStore(_cfg(redis_server.url, host_bytes=1 << 22), FP) as other:
        for j in range(3):
            v = other.get(e.key, e.token_ids, context=f"ctx{j}".encode(), timeout=30)
            assert v.how == "exact" and torch.equal(v.k, e.k + j + 1)
