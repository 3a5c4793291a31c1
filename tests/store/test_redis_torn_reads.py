"""A Redis read is several GETRANGE calls, so another instance's overwrite can tear it: such a read is a
miss that deletes nothing, while an entry whose stored bytes are corrupt is deleted.

Another instance's write is a second `RedisTier` on the same real `redis-server`, run at the exact point
between two reads by wrapping the reading store's own calls (between its prefix and header reads, and
between its header read and its body reads).  The overwriting entry has the same key and a longer
context signature, so its header is longer and every offset the torn read took from the old header is off.
"""

from __future__ import annotations

import redis
import torch

from kvreuse.store import ChunkStore, StoreConfig
from kvreuse.store.persist import PREFIX_BYTES, encode
from kvreuse.store.tiers.redis import RedisTier
from tests.store.conftest import FP, make_entry

OLD = make_entry(1)
NEW = make_entry(1, context=b"another instance's context, a longer signature")  # same key, longer header


def _store(url: str) -> ChunkStore:
    return ChunkStore(StoreConfig(host_bytes=1 << 20, redis_url=url, redis_bytes=1 << 24), FP)


def _only_in_redis(store: ChunkStore, e) -> None:
    assert store.put(e)
    store.flush()
    store.memory[0].pop(e.key)


def _check_new_entry_kept(store: ChunkStore, other: RedisTier) -> None:
    assert other.get_blob(NEW.key) == encode(NEW, FP.digest)
    assert other.usage() == (len(encode(NEW, FP.digest)), 1)  # its accounting too
    assert store.snapshot_stats().tiers["redis"].dropped_corrupt == 0
    r = store.redis.open(NEW.key)
    assert r is not None and r.header.context == NEW.context
    v = store.get(NEW.key, NEW.token_ids, timeout=30)  # and it is served
    assert v is not None and torch.equal(v.k, NEW.k) and torch.equal(v.v, NEW.v)


def test_a_body_read_torn_by_an_overwrite_keeps_the_new_entry(redis_server):
    other = RedisTier(redis_server.url, 1 << 24, FP.digest)
    with _store(redis_server.url) as store:
        _only_in_redis(store, OLD)
        opened = store.redis.open

        def open_then_overwritten(key):  # the header is read; another instance writes before the body is
            r = opened(key)
            assert other.put_blob(key, encode(NEW, FP.digest), cost=1.0, hits=0)
            return r

        store.redis.open = open_then_overwritten
        assert store.get(OLD.key, OLD.token_ids, timeout=30) is None  # the torn read fails: a miss
        assert store.stats.failed_loads == 1
        del store.redis.open
        _check_new_entry_kept(store, other)
    other.close()


def test_a_header_read_torn_by_an_overwrite_keeps_the_new_entry(redis_server):
    other = RedisTier(redis_server.url, 1 << 24, FP.digest)
    with _store(redis_server.url) as store:
        _only_in_redis(store, OLD)
        client = store.redis.client
        getrange = client.getrange
        reads = 0

        def first_read_then_overwritten(name, start, end):  # another instance writes right after the prefix read
            nonlocal reads
            r = getrange(name, start, end)
            reads += 1
            if reads == 1:
                assert other.put_blob(OLD.key, encode(NEW, FP.digest), cost=1.0, hits=0)
            return r

        client.getrange = first_read_then_overwritten
        assert store.get(OLD.key, OLD.token_ids, timeout=30) is None  # the entry changed under the read: a miss
        del client.getrange
        _check_new_entry_kept(store, other)
    other.close()


def test_a_corrupt_entry_is_deleted_and_a_miss(redis_server):
    admin = redis.Redis.from_url(redis_server.url)
    a, b = make_entry(2), make_entry(3)
    with _store(redis_server.url) as store:
        for e in (a, b):
            _only_in_redis(store, e)
        name_a, name_b = store.redis.entry_name(a.key), store.redis.entry_name(b.key)
        admin.setrange(name_a, admin.strlen(name_a) - 5, b"\xff\x00\xff")  # tensor bytes: the body read fails
        assert store.get(a.key, a.token_ids, timeout=30) is None
        assert store.stats.failed_loads == 1
        admin.setrange(name_b, PREFIX_BYTES + 3, b"\xff\x00\xff")  # header bytes: the header read fails
        assert store.get(b.key, b.token_ids, timeout=30) is None
        s = store.snapshot_stats()
        assert s.tiers["redis"].misses == 1 and s.tiers["redis"].dropped_corrupt == 2
        assert not admin.exists(name_a) and not admin.exists(name_b)
        assert store.redis.usage() == (0, 0) and store.redis.index_records(FP.digest, 10) == {}
        # deleted under a read by something other than kvreuse (Redis' own eviction): its accounting goes too
        c = make_entry(4)
        _only_in_redis(store, c)
        r = store.redis.open(c.key)
        admin.delete(store.redis.entry_name(c.key))
        assert not store.redis.drop_corrupt(c.key, r.version)
        assert store.redis.usage() == (0, 0)
    admin.close()
