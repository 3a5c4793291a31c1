"""`redis_url` naming a Redis Cluster: entries spread over the nodes, a node killed mid-run is misses.

A real 3-master cluster on loopback (`redis-cli --cluster create`).  The tier detects it, shards
its budget over hash-tagged prefixes (an entry and its accounting share a slot), and keeps the
shared budget; another store and the scheduler's index see every entry.  Killing a node with
SIGKILL mid-run loses that node's entries: lookups of them miss, writes to it fail quietly, the
surviving nodes keep serving, and nothing raises.  The lost node's shards are backed off alone: tried
once, then misses without a call until the back-off ends.
"""

from __future__ import annotations

import pytest
import torch

from kvreuse.connector.remote import RemoteLookup
from kvreuse.store import ChunkStore, StoreConfig
from tests.store.conftest import FP, make_entry
from tests.store.test_budgets import check_budgets
from tests.support.redis_cluster import redis_cluster_or_skip


@pytest.fixture
def cluster():
    cl = redis_cluster_or_skip()
    try:
        yield cl
    finally:
        cl.close()


def test_cluster_shares_entries_and_survives_a_killed_node(cluster):
    cfg = StoreConfig(host_bytes=1 << 24, redis_url=cluster.url, redis_bytes=1 << 26)
    entries = [make_entry(s) for s in range(40)]
    with ChunkStore(cfg, FP) as a:
        assert a.redis.cluster
        for e in entries:
            assert a.put(e)
        a.flush()
        assert all(a.redis.contains(e.key) for e in entries)
        check_budgets(a)
    assert sum(n > 0 for n in cluster.keys_per_node()) == 3  # the shards spread over every node
    remote = RemoteLookup(cluster.url, 1 << 26, FP.digest, start=False)
    with ChunkStore(cfg, FP) as b:
        for e in entries:
            v = b.get(e.key, e.token_ids, timeout=30)  # another store reads them from the cluster
            assert v is not None and torch.equal(v.k, e.k) and torch.equal(v.v, e.v)
        assert remote.refresh() and all(remote.lookup(e.key.digest) == (e.num_tokens, (e.context,))
                                        for e in entries)
        for e in entries:
            b.memory[0].pop(e.key)
        cluster.kill(1)  # mid-run: no replica, its slots are gone
        b.redis.retry_seconds = 60.0  # no retry within this test: what is tried is counted exactly
        errors = b.redis.errors
        served = []
        for e in entries:
            v = b.get(e.key, e.token_ids, timeout=30)
            assert v is None or torch.equal(v.k, e.k)
            served.append(v is not None)
        assert 0 < sum(served) < len(entries)  # the survivors' entries are still served
        # each lost shard was tried once, then backed off alone: no call waited on the dead node again
        lost = {b.redis._prefix(e.key) for e, ok in zip(entries, served) if not ok}
        assert b.redis.errors - errors == len(lost)
        assert all(not b.redis.available(p) for p in lost)
        assert all(b.redis.available(p) for p in set(b.redis.prefixes) - lost)
        more = [make_entry(100 + s) for s in range(20)]
        for e in more:
            b.put(e)  # writes routed to the dead node fail quietly
        b.flush()
        assert 0 < sum(b.redis.contains(e.key) for e in more) < len(more)
        assert b.snapshot_stats().tiers["redis"].errors > 0
        assert remote.refresh()  # the survivors' shards are read; the dead node's entries leave the index
        listed = [remote.lookup(e.key.digest) is not None for e in entries]
        assert listed == served
    remote.close()
