"""Several instances, one Redis tier: a scheduler claims chunks that *another* instance stored.

A real `redis-server`; instance A is a `ChunkStore` writing through to Redis (what A's worker does
after computing chunks), instance B is only the scheduler-side logic with an empty local directory.
"""

from __future__ import annotations

import pytest
import torch

from kvreuse.connector.claim import Directory, chunk_keys, context_signature
from kvreuse.connector.plan import plan_saves, plan_segments
from kvreuse.connector.remote import RemoteLookup
from kvreuse.connector.segment import Chunk
from kvreuse.store import ChunkEntry, ChunkKey, ChunkStore, ModelFingerprint, StoreConfig
from tests.support.redis_server import redis_server_or_skip

FP = ModelFingerprint("TestArch", "weights-sha256-0", "bfloat16")


@pytest.fixture
def redis_url():
    srv = redis_server_or_skip()
    try:
        yield srv.url
    finally:
        srv.close()


def _chunks(sizes):
    out, start = [], 0
    for n in sizes:
        out.append(Chunk(start, start + n))
        start += n
    return out


def test_scheduler_claims_chunks_stored_by_another_instance(redis_url):
    tokens = list(range(100, 100 + 40))
    chunks = _chunks([12, 12, 12, 4])
    keys = chunk_keys(tokens, chunks, FP.digest, None)
    cfg = StoreConfig.from_dict({"device_bytes": "64MiB", "redis_url": redis_url, "redis_bytes": "64MiB"})
    # instance A stores chunks 0 and 1 (chunk 1 computed after chunk 0), write-through to Redis
    with ChunkStore(cfg, FP) as a:
        for j, ctx in ((0, context_signature(())), (1, context_signature((keys[0],)))):
            c = chunks[j]
            ids = torch.tensor(tokens[c.start:c.end])
            kv = torch.randn(2, c.end - c.start, 2, 8).bfloat16()
            assert a.put(ChunkEntry(ChunkKey(keys[j]), ids, torch.arange(c.start, c.end), kv, kv.clone(), context=ctx))
        a.flush()
    # instance B: nothing local, but the shared tier is visible
    local_only = plan_segments(tokens, chunks, keys, Directory(), 0, "fast", gaps=False)
    assert local_only.items == [] and local_only.misses == 3
    remote = RemoteLookup(redis_url, 64 << 20, FP.digest, start=False)
    assert remote.refresh()  # the scheduler's copy of the shared tier's index (a background thread in a server)
    d = Directory(remote)
    claim = plan_segments(tokens, chunks, keys, d, 0, "fast", gaps=False)
    assert [it.policy for it in claim.items] == ["exact", "exact"] and claim.leading == 24
    assert claim.misses == 1                                   # chunk 2 is nowhere: the claim ends there
    # chunk 0 dropped: chunk 1 now opens the prompt; a remote entry's preceding keys are unknown,
    # so this is served blind (locally it would be "survival")
    dropped = plan_segments(tokens[12:], _chunks([12, 12, 4]), keys[1:], d, 0, "fast", gaps=False)
    assert [it.policy for it in dropped.items] == ["blind"]
    # reordered (chunk 1 first): claimed blind, the remote entry's own context is what is read
    moved = plan_segments(tokens[12:24] + tokens[:12] + tokens[24:], _chunks([12, 12, 16]),
                          [keys[1], keys[0], keys[2]], d, 0, "fast", gaps=False)
    assert [it.policy for it in moved.items] == ["blind", "blind"]
    assert moved.items[0].context == context_signature((keys[0],))
    assert plan_segments(tokens[12:24] + tokens[:12] + tokens[24:], _chunks([12, 12, 16]),
                         [keys[1], keys[0], keys[2]], d, 0, "exact", gaps=False).items == []
    # B does not re-save chunks the shared tier already holds, and captures no patch for them
    saves = plan_saves(tokens, chunks, keys, d, set(), capture_patches=True)
    assert [s.key for s in saves] == [keys[2], keys[3]]
    # another model's entries are invisible
    theirs = RemoteLookup(redis_url, 64 << 20, ModelFingerprint("Other", "w", "bfloat16").digest, start=False)
    assert theirs.refresh()
    other = Directory(theirs)
    assert plan_segments(tokens, chunks, keys, other, 0, "fast", gaps=False).items == []


def test_redis_down_is_a_miss(redis_url):
    d = Directory(RemoteLookup("redis://127.0.0.1:1/0", 1 << 20, FP.digest))
    tokens = list(range(30))
    chunks = _chunks([10, 10, 10])
    keys = chunk_keys(tokens, chunks, FP.digest, None)
    assert plan_segments(tokens, chunks, keys, d, 0, "fast", gaps=False).items == []


def test_contexts_gained_after_the_first_publish_reach_other_instances(redis_url):
    """A stores chunk 1 after chunk 0, then computes it again after chunk 2: B's directory and store learn both."""
    tokens = list(range(500, 500 + 48))
    chunks = _chunks([12, 12, 12, 12])
    keys = chunk_keys(tokens, chunks, FP.digest, None)
    after0, after2 = context_signature((keys[0],)), context_signature((keys[2],))
    cfg = StoreConfig.from_dict({"device_bytes": "64MiB", "redis_url": redis_url, "redis_bytes": "64MiB"})
    remote = RemoteLookup(redis_url, 64 << 20, FP.digest, start=False)
    ids = [torch.tensor(tokens[c.start:c.end]) for c in chunks]
    kv = [torch.randn(2, 12, 2, 8).bfloat16() for _ in chunks]
    with ChunkStore(cfg, FP) as a:
        for j, ctx in ((0, context_signature(())), (1, after0), (2, context_signature(()))):
            assert a.ingest(ChunkKey(keys[j]), ids[j], torch.arange(12 * j, 12 * j + 12), kv[j], kv[j].clone(), ctx)
        a.flush()
        assert remote.refresh() and remote.lookup(keys[1]) == (12, (after0,))
        # prompt [chunk 2, chunk 1]: A computes chunk 1 after chunk 2 (same positions: no relocation needed)
        k_new = kv[1] + 0.5
        assert a.ingest(ChunkKey(keys[1]), ids[1], torch.arange(12, 24), k_new, k_new.clone(), after2)
        a.flush()
    assert remote.refresh() and set(remote.lookup(keys[1])[1]) == {after0, after2}
    prompt = tokens[24:36] + tokens[12:24] + tokens[36:]
    claim = plan_segments(prompt, chunks, [keys[2], keys[1], keys[3]], Directory(remote), 0, "fast", gaps=False)
    assert [it.policy for it in claim.items] == ["exact", "exact"]  # without the republish: chunk 1 "blind"
    with ChunkStore(StoreConfig.from_dict({"host_bytes": "64MiB", "redis_url": redis_url, "redis_bytes": "64MiB"}),
                    FP) as b:
        view = b.get(ChunkKey(keys[1]), ids[1], context=after2, timeout=30)
        assert view.how == "exact" and torch.equal(view.k, k_new)
    remote.close()
