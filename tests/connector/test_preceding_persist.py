"""Preceding keys persist with a chunk's context: a restarted or remote directory plans survival, not blind.

The scheduler side plans saves (each item carries the last keys before its chunk), the worker side
copies the chunks out of a synthetic CPU paged cache into a store with a disk tier (and a real
Redis tier in the second test); then a *new* scheduler side rebuilds its directory from the disk
headers (restart) or reads the shared tier's index (another instance), and plans a prompt in which
a chunk's predecessor was dropped.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from kvreuse.connector.claim import Directory, chunk_keys  # noqa: E402
from kvreuse.connector.config import ConnectorConfig  # noqa: E402
from kvreuse.connector.plan import plan_segments  # noqa: E402
from kvreuse.connector.remote import RemoteLookup  # noqa: E402
from kvreuse.connector.scheduler import SchedulerSide  # noqa: E402
from kvreuse.connector.segment import segment  # noqa: E402
from kvreuse.connector.worker import WorkerSide  # noqa: E402
from kvreuse.rope.spec import RopeSpec  # noqa: E402
from kvreuse.store import ChunkKey, ChunkStore, ModelFingerprint, scan_index  # noqa: E402
from tests.support.redis_server import redis_server_or_skip  # noqa: E402
from tests.support.sched_requests import SchedRequest, message  # noqa: E402

START, BS, L, H, D, NB = 2, 128, 1, 2, 32, 8
FP = ModelFingerprint("Tiny", "w", "float32")
ROPE = RopeSpec.from_hf_config({"hidden_size": 64, "num_attention_heads": 2, "head_dim": D, "rope_theta": 10000.0,
                                "max_position_embeddings": 4096, "model_type": "llama"})


Req = SchedRequest


def msg(seed: int, n: int) -> list[int]:
    """One message: a boundary token, then n tokens (the boundary makes it its own chunk)."""
    return message(seed, n, START)


def config(**store) -> ConnectorConfig:
    # one chunk per message (cuts at message starts, none inside 41 tokens); every stored chunk is placed (exactness is not what this checks)
    return ConnectorConfig.from_extra_config({"chunking": {"min_tokens": 64, "avg_tokens": 64, "max_tokens": 64},
                                              "cost": {"learn": False, "step_overhead_s": 0.0}, **store})


def save_prompt(cfg: ConnectorConfig, prompt: list[int]) -> tuple[SchedulerSide, list]:
    """Plan the prompt's saves on a scheduler side and run them through a worker side; the store is closed."""
    s = SchedulerSide(cfg, FP.digest, frozenset({START}), block_size=16)
    r = Req("r1", prompt)
    s.after_alloc(r, s.matched(r, 0))
    out = SimpleNamespace(scheduled_new_reqs=[SimpleNamespace(req_id="r1", num_computed_tokens=0)],
                          scheduled_cached_reqs=SimpleNamespace(req_ids=[], num_computed_tokens=[]),
                          num_scheduled_tokens={"r1": len(prompt)}, scheduled_encoder_inputs={})
    meta = s.build_meta(out, lambda rid: list(range(NB)))
    items = [it for sv in meta.saves for it in sv.items]
    assert len(items) == 4
    assert all(it.recent == tuple(x.key for x in items[:j]) for j, it in enumerate(items)), \
        "saves reach the worker with the keys before each chunk"
    w = WorkerSide(cfg, ROPE, FP)
    caches = {"model.layers.0.self_attn.attn": torch.randn(NB, H, BS, 2 * D)}
    w.register(caches, "CPU_ATTN", H, D)
    w.save(meta)
    w.close()  # flushes the write-behind to disk and the write-through to Redis
    return s, items


def policies(directory: Directory, s: SchedulerSide, prompt: list[int]) -> list[str]:
    """The policy of each placed chunk of `prompt`, as scheduler side `s` plans it from `directory`."""
    chunks = segment(prompt, s.cfg.chunking, boundary_ids=frozenset({START}))
    keys = chunk_keys(prompt, chunks, FP.digest, None)
    return [it.policy for it in plan_segments(prompt, chunks, keys, directory, 0, "fast", cost=s.cost).items]


def test_restarted_directory_plans_survival_from_disk_headers(tmp_path):
    A, B, C, tail = msg(1, 40), msg(2, 40), msg(3, 40), msg(4, 40)
    cfg = config(host_bytes="64MiB", disk_path=str(tmp_path), disk_bytes="64MiB")
    warm, items = save_prompt(cfg, A + B + C + tail)
    # the headers on disk carry each chunk's preceding keys
    recs = {r.key: r for r in scan_index(str(tmp_path), [FP.digest])}
    assert len(recs) == 4
    for it in items:  # (the first chunk has none: its context is the empty one)
        assert recs[it.key].preceding == ({it.context: it.recent} if it.recent else {})
    with ChunkStore(cfg.store, FP) as reopened:  # the entry read back from disk keeps them too
        e = reopened.fetch(ChunkKey(items[2].key), items[2].token_ids).result(10)
        assert e.preceding == {items[2].context: items[2].recent}
    dropped = A + C + tail + msg(5, 3)           # B dropped: C and the tail follow A directly
    restarted = SchedulerSide(cfg, FP.digest, frozenset({START}), block_size=16)  # directory from disk
    assert len(restarted.directory) == 4
    got = policies(restarted.directory, restarted, dropped)
    assert got == ["exact", "survival", "survival"], got
    assert got == policies(warm.directory, warm, dropped)  # as the scheduler that saved them would plan
    moved = C + A + tail + msg(6, 3)             # reordered: C first, then A
    assert policies(restarted.directory, restarted, moved) == ["survival", "blind", "reorder"]


def test_remote_directory_plans_survival_from_the_shared_tier():
    srv = redis_server_or_skip()
    try:
        A, B, C, tail = msg(11, 40), msg(12, 40), msg(13, 40), msg(14, 40)
        cfg = config(host_bytes="64MiB", redis_url=srv.url, redis_bytes="64MiB")
        _, items = save_prompt(cfg, A + B + C + tail)
        other = SchedulerSide(config(), FP.digest, frozenset({START}), block_size=16)  # another instance
        remote = RemoteLookup(srv.url, 64 << 20, FP.digest, start=False)
        try:
            assert remote.refresh()
            for it in items:
                assert remote.record(it.key).preceding == ({it.context: it.recent} if it.recent else {})
            d = Directory(remote)
            assert policies(d, other, A + C + tail + msg(15, 3)) == ["exact", "survival", "survival"]
        finally:
            remote.close()
    finally:
        srv.close()
