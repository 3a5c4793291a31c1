"""Redis answering with errors — a read-only replica, out of memory, an ACL that forbids — or not at all
is misses, never errors.

A real `redis-server` put into each state: `REPLICAOF` a master that does not exist (READONLY),
`maxmemory` below what the server holds, with `noeviction` (OOM), ACL users without write or read
rights (NOPERM), and stopped (SIGSTOP: connected, silent).  Every store call returns normally (a
lookup with a timeout within it), errors are counted, what can still be read is served, and the
tier works again once Redis does.
"""

from __future__ import annotations

import os
import signal
import time

import redis
import torch

from kvreuse.connector.remote import RemoteLookup
from kvreuse.store import ChunkStore, StoreConfig
from tests.store.conftest import FP, make_entry


def _cfg(url: str) -> StoreConfig:
    return StoreConfig(host_bytes=1 << 24, redis_url=url, redis_bytes=1 << 26)


def _exercise(store: ChunkStore, stored, new) -> None:
    """Every path that talks to Redis, with Redis refusing writes: reads of `stored` work, `new` misses."""
    assert store.put(new) in (True, False)  # memory may take it; the write-through fails quietly
    store.flush()
    store.memory[0].pop(new.key)
    assert store.contains(new.key) is None and store.get(new.key, new.token_ids, timeout=30) is None
    v = store.get(stored.key, stored.token_ids, timeout=30)  # the rehydration's touch is a write too
    assert v is not None and torch.equal(v.k, stored.k)
    store.memory[0].pop(stored.key)
    store.remove(stored.key)  # refused: still there
    store.snapshot_stats()


def test_read_only_replica(redis_server):
    admin = redis.Redis.from_url(redis_server.url)
    a, b = make_entry(1), make_entry(2)
    with ChunkStore(_cfg(redis_server.url), FP) as store:
        store.put(a)
        store.flush()
        admin.replicaof("127.0.0.1", 1)  # a master that never answers: the data stays, writes are READONLY
        try:
            _exercise(store, a, b)
            assert store.snapshot_stats().tiers["redis"].errors >= 2
            assert store.contains(a.key) == "redis"
        finally:
            admin.replicaof("NO", "ONE")
        store.put(b)
        store.flush()
        assert store.redis.contains(b.key)


def test_out_of_memory(redis_server):
    admin = redis.Redis.from_url(redis_server.url)
    a, b = make_entry(1), make_entry(2)
    with ChunkStore(_cfg(redis_server.url), FP) as store:
        store.put(a)
        store.flush()
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1 << 20)  # below what the server already uses: every write is OOM
        try:
            _exercise(store, a, b)
            assert store.snapshot_stats().tiers["redis"].errors >= 1
        finally:
            admin.config_set("maxmemory", 0)
        store.put(b)
        store.flush()
        assert store.redis.contains(b.key)


def test_acl_without_write_or_read_rights(redis_server):
    admin = redis.Redis.from_url(redis_server.url)
    admin.acl_setuser("reader", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-@write"])
    admin.acl_setuser("blind", enabled=True, passwords=["+pw"], keys=["*"],
                      commands=["+@all", "-getrange", "-get", "-hscan"])
    host = redis_server.url.split("//", 1)[1]
    a, b = make_entry(1), make_entry(2)
    with ChunkStore(_cfg(redis_server.url), FP) as store:
        store.put(a)
        store.flush()
    with ChunkStore(_cfg(f"redis://reader:pw@{host}"), FP) as store:
        _exercise(store, a, b)
        assert store.snapshot_stats().tiers["redis"].errors >= 2
    with ChunkStore(_cfg(f"redis://blind:pw@{host}"), FP) as store:
        assert store.get(a.key, a.token_ids, timeout=30) is None and store.contains(a.key) is None
        assert store.snapshot_stats().tiers["redis"].errors >= 1
    remote = RemoteLookup(f"redis://blind:pw@{host}", 1 << 26, FP.digest, start=False)
    try:  # the scheduler's index: a refused refresh is a failed refresh, and lookups miss
        assert not remote.refresh() and remote.lookup(a.key.digest) is None
    finally:
        remote.close()


def test_a_stalled_redis_is_a_miss_within_the_lookup_timeout(redis_server):
    a, b = make_entry(1), make_entry(2)
    with ChunkStore(_cfg(redis_server.url), FP) as store:
        for e in (a, b):
            store.put(e)
        store.flush()
        for e in (a, b):
            store.memory[0].pop(e.key)  # only Redis holds them
        os.kill(redis_server.proc.pid, signal.SIGSTOP)  # connections stay open; nothing answers
        try:
            t0 = time.monotonic()
            assert store.get(a.key, a.token_ids, timeout=0.5) is None
            assert store.get(b.key, b.token_ids, timeout=0.0) is None  # the step's time is spent: no wait
            assert time.monotonic() - t0 < 1.5
            assert store.stats.load_timeouts == 2
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        time.sleep(store.redis.retry_seconds)
        v = store.get(a.key, a.token_ids, timeout=30)
        assert v is not None and torch.equal(v.k, a.k)


def test_a_lost_server_is_backed_off_then_tried_again(redis_server):
    """While backed off, calls are misses that do not touch the network; each failed try doubles the back-off
    (up to its cap); the first call that succeeds resets it."""
    from kvreuse.store.tiers.redis import RedisTier

    e = make_entry(1)
    tier = RedisTier(redis_server.url, 1 << 24, FP.digest, retry_seconds=0.05, max_retry_seconds=0.15)
    try:
        redis_server.stop()
        assert not tier.contains(e.key) and tier.errors == 1 and tier.backoff_seconds() == 0.05
        assert not tier.available()
        for _ in range(50):
            assert tier.open(e.key) is None and not tier.contains(e.key)
        assert tier.errors == 1  # backed off: not tried
        for want in (0.1, 0.15, 0.15):  # doubled per failed try, capped
            while not tier.available():
                time.sleep(0.01)
            assert not tier.contains(e.key)
            assert tier.backoff_seconds() == want
        errors = tier.errors
        redis_server.start()
        while not tier.available():
            time.sleep(0.01)
        assert tier.usage() is not None and tier.backoff_seconds() == 0 and tier.errors == errors
    finally:
        tier.close()
