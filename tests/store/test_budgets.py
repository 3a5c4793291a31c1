"""Budgets hold after every operation of long randomized sequences (puts, gets, demotions, evictions)."""

from __future__ import annotations

import os
import random

import pytest
import torch

from kvreuse import fit_patch
from kvreuse.store import ChunkStore, StoreConfig
from tests.store.conftest import FP, make_entry


def check_budgets(store: ChunkStore) -> None:
    """Recount every tier from scratch and compare with its accounting and its budget."""
    for t in store.memory:
        actual = sum(e.nbytes for e in t.entries.values()) + sum(t.reserved.values())
        assert t.used_bytes == actual, (t.name, t.used_bytes, actual)
        assert actual <= t.budget_bytes, (t.name, actual, t.budget_bytes)
        for e in t.entries.values():
            assert e.k.device == t.device
    keys = [set(t.entries) for t in store.memory]
    assert all(not (a & b) for i, a in enumerate(keys) for b in keys[i + 1:]), "memory tiers are exclusive"
    if store.disk is not None:
        d = store.disk
        files = [f for f in os.listdir(d.dir) if f.endswith(".kvc")]
        on_disk = sum(os.path.getsize(os.path.join(d.dir, f)) for f in files)
        assert len(files) == len(d.index)
        assert on_disk == d.used_bytes <= d.budget_bytes, (on_disk, d.used_bytes, d.budget_bytes)
    if store.redis is not None:
        used, actual = store.redis.used_bytes(), store.redis.actual_bytes()
        assert used is None or used == actual
        assert actual is None or actual <= store.redis.budget_bytes


def _context_kv(e, seed):
    g = torch.Generator().manual_seed(seed)
    dk = 0.05 * torch.randn(e.k.shape[0], e.k.shape[1], 1, 1, generator=g)
    return (e.k.float() + dk).to(e.k.dtype), (e.v.float() - dk).to(e.v.dtype)


def run_sequence(store: ChunkStore, rng: random.Random, steps: int, universe: int) -> dict[str, int]:
    ops = {"put": 0, "get": 0, "ctx": 0, "patch": 0, "demote": 0, "evict": 0, "hit": 0}
    for _ in range(steps):
        i = rng.randrange(universe)
        e = make_entry(i, tokens=4 + i % 5, layers=2)
        op = rng.choices(list(ops)[:6], weights=[4, 5, 2, 1, 1, 1])[0]
        ops[op] += 1
        if op == "put":
            store.put(e)
        elif op == "get":
            v = store.get(e.key, e.token_ids, timeout=30)
            if v is not None:
                ops["hit"] += 1
                assert torch.equal(v.k, e.k) and torch.equal(v.v, e.v)
        elif op == "ctx":
            store.add_context_kv(e.key, b"ctx-%d" % rng.randrange(3), *_context_kv(e, rng.randrange(99)))
        elif op == "patch":
            ck, cv = _context_kv(e, 7)
            p = fit_patch(ck.float() - e.k.float(), cv.float() - e.v.float(), max_rank=2, dtype=e.k.dtype)
            store.add_patch(e.key, b"p-%d" % rng.randrange(2), p)
        elif op == "demote":
            store.demote(e.key if rng.random() < 0.5 else None)
        else:
            store.evict(e.key)
        store.flush()
        check_budgets(store)
    return ops


@pytest.mark.parametrize("policy", ["cost", "lru"])
def test_memory_and_disk_budgets_hold(tmp_path, policy):
    one = make_entry(0, tokens=8, layers=2).nbytes
    cfg = StoreConfig(device_bytes=3 * one, host_bytes=5 * one, disk_path=str(tmp_path), disk_bytes=9 * one)
    rng = random.Random(1234 if policy == "cost" else 99)
    with ChunkStore(cfg, FP, policy=policy) as store:
        ops = run_sequence(store, rng, 1500, universe=40)
        s = store.snapshot_stats()
    assert ops["hit"] > 50 and s.demotions > 10
    assert s.tiers["device"].evictions > 50 and s.tiers["disk"].evictions > 10
    assert s.rehydrations > 10


def test_budgets_hold_with_redis(tmp_path, redis_server):
    one = make_entry(0, tokens=8, layers=2).nbytes
    cfg = StoreConfig(host_bytes=4 * one, disk_path=str(tmp_path), disk_bytes=6 * one,
                      redis_url=redis_server.url, redis_bytes=12 * one)
    with ChunkStore(cfg, FP) as store:
        ops = run_sequence(store, random.Random(7), 600, universe=40)
        s = store.snapshot_stats()
    assert ops["hit"] > 20 and s.tiers["redis"].puts > 10 and s.tiers["redis"].evictions > 0
