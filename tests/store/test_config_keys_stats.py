"""Config validation, content keys, mergeable stats and the eviction policies."""

from __future__ import annotations

import os
import random

import pytest
import torch

from kvreuse.store import (ChunkKey, CostAwarePolicy, LatencyHistogram, LRUPolicy, ModelFingerprint, StoreConfig,
                           StoreConfigError, StoreStats, TierStats, parse_size, weights_id_from_files)
from kvreuse.store.stats import LATENCY_BUCKETS_SECONDS
from tests.store.conftest import FP


# ------------------------------------------------------------------ config
@pytest.mark.parametrize("text,n", [(1024, 1024), ("0", 0), ("512MiB", 512 * 2**20), ("2GiB", 2 * 2**30),
                                    ("1.5GB", 1_500_000_000), (" 3 kb ", 3000), ("10G", 10 * 2**30)])
def test_parse_size(text, n):
    assert parse_size(text) == n


def test_full_config(tmp_path):
    c = StoreConfig.from_dict({"device_bytes": "2GiB", "host_bytes": "16GiB", "disk_path": str(tmp_path / "c"),
                               "disk_bytes": "200GiB", "redis_url": "redis://cache:6379/0", "redis_bytes": "1.5GB"})
    assert c.device_bytes == 2 * 2**30 and c.redis_bytes == 1_500_000_000 and os.path.isdir(tmp_path / "c")
    assert StoreConfig.from_dict({}) == StoreConfig()


@pytest.mark.parametrize("d,key", [
    ({"device_byte": 1}, "device_byte"),
    ({"host_bytes": -1}, "host_bytes"),
    ({"host_bytes": "-3GiB"}, "host_bytes"),
    ({"device_bytes": "lots"}, "device_bytes"),
    ({"device_bytes": "3 parsecs"}, "device_bytes"),
    ({"device_bytes": True}, "device_bytes"),
    ({"disk_path": "/proc/kvreuse-nope", "disk_bytes": 10}, "disk_path"),
    ({"disk_bytes": "1GiB"}, "disk_path"),
    ({"redis_url": "http://x:1", "redis_bytes": 1}, "redis_url"),
    ({"redis_url": "redis://h:99999999", "redis_bytes": 1}, "redis_url"),
    ({"redis_url": "redis://h:1"}, "redis_bytes"),
])
def test_bad_config_names_the_key(d, key):
    with pytest.raises(ValueError, match=rf"^{key}:"):
        StoreConfig.from_dict(d)


def test_uncreatable_path_under_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(StoreConfigError, match="^disk_path: cannot create"):
        StoreConfig.from_dict({"disk_path": str(f / "sub"), "disk_bytes": 1})


# ------------------------------------------------------------------ keys
def test_keys_cover_every_field():
    ids = [1, 2, 3]
    k = ChunkKey.of(FP, ids)
    assert k == ChunkKey.of(FP.digest, torch.tensor(ids, dtype=torch.int32)) == ChunkKey.from_hex(k.hex())
    others = [ChunkKey.of(FP, [1, 2, 4]), ChunkKey.of(FP, [1, 2]), ChunkKey.of(FP, ids, cache_salt="s"),
              ChunkKey.of(FP, ids, cache_salt=""), ChunkKey.of(FP, ids, mm_ids=["img-a"]),
              ChunkKey.of(FP, ids, mm_ids=["img-b"]), ChunkKey.of(FP, ids, mm_ids=["img-a", ""]),
              *[ChunkKey.of(ModelFingerprint(**{**FP.__dict__, f: v}), ids) for f, v in
                [("architecture", "Other"), ("weights_id", "w2"), ("dtype", "float16"), ("tp_size", 2),
                 ("tp_rank", 0)] if (f, v) != ("tp_rank", 0)]]
    assert len({k, *others}) == len(others) + 1


def test_fingerprint_validation_and_file_ids(tmp_path):
    with pytest.raises(ValueError, match="tp_rank"):
        ModelFingerprint("A", "w", "bf16", tp_rank=2, tp_size=2)
    (tmp_path / "a.safetensors").write_bytes(b"abc")
    (tmp_path / "b.safetensors").write_bytes(b"def")
    ids = weights_id_from_files([tmp_path / "b.safetensors", tmp_path / "a.safetensors"])
    assert ids == weights_id_from_files([tmp_path / "a.safetensors", tmp_path / "b.safetensors"])
    (tmp_path / "b.safetensors").write_bytes(b"deg")
    assert ids != weights_id_from_files([tmp_path / "a.safetensors", tmp_path / "b.safetensors"])


# ------------------------------------------------------------------ stats
def _random_stats(rng: random.Random) -> StoreStats:
    s = StoreStats(lookups=rng.randrange(100), demotions=rng.randrange(9))
    for name in rng.sample(["device", "host", "disk", "redis"], 2):
        s.tiers[name] = TierStats(hits=rng.randrange(50), used_bytes=rng.randrange(1 << 20))
    s.hits_by_policy[rng.choice(["exact", "patched"])] = rng.randrange(10)
    for _ in range(rng.randrange(20)):
        s.lookup_seconds.observe(rng.random() * 0.01)
    return s


def test_stats_merge_is_a_sum():
    rng = random.Random(0)
    a, b, c = (_random_stats(rng) for _ in range(3))
    ab_c, a_bc = a.merge(b).merge(c), a.merge(b.merge(c))
    assert ab_c == a_bc and a.merge(StoreStats()) == a
    assert ab_c.lookups == a.lookups + b.lookups + c.lookups
    assert ab_c.lookup_seconds.count == sum(x.lookup_seconds.count for x in (a, b, c))
    hits = sum(t.hits for x in (a, b, c) for t in x.tiers.values())
    assert sum(t.hits for t in ab_c.tiers.values()) == hits
    before = a.lookups
    a.merge(b)
    assert a.lookups == before  # inputs untouched


def test_histogram_buckets():
    h = LatencyHistogram()
    for x in (0.0, 1e-5, 1.1e-5, 0.5, 100.0):
        h.observe(x)
    assert h.counts[0] == 2 and h.counts[1] == 1 and h.counts[-1] == 1
    assert h.counts[LATENCY_BUCKETS_SECONDS.index(1.0)] == 1 and h.count == 5


# ------------------------------------------------------------------ policies
def test_lru_order():
    p = LRUPolicy()
    for k in "abc":
        p.update(k, nbytes=1, cost=1, hits=0)
    p.update("a", nbytes=1, cost=1, hits=1)
    assert p.victims() == ["b", "c", "a"] and p.peek() == "b"


def test_cost_aware_prefers_cost_per_byte_and_frequency_and_ages():
    p = CostAwarePolicy()
    p.update("cheap_big", nbytes=1000, cost=1.0, hits=0)
    p.update("dear_small", nbytes=100, cost=1.0, hits=0)
    p.update("popular", nbytes=1000, cost=1.0, hits=20)
    assert p.victims() == ["cheap_big", "dear_small", "popular"]  # 0.001 < 0.01 < 0.021
    p.evicted("cheap_big")
    assert p.clock == pytest.approx(1e-3)
    p.update("new", nbytes=1000, cost=1.0, hits=0)  # starts from the clock, above the evicted one
    assert p.victims()[0] == "new" and p._prio["new"][0] == pytest.approx(2e-3)
    evicted = []
    for i in range(20):  # a stream of one-off entries raises the clock until the idle popular entry ages out
        p.update(f"x{i}", nbytes=100, cost=1.0, hits=0)
        v = p.peek()
        evicted.append(v)
        p.evicted(v)
    assert "popular" in evicted and "dear_small" in evicted
