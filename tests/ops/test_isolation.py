"""Tenant isolation: requests with different `cache_salt` never share chunks, on any tier; under
`isolation: "salted_only"` unsalted requests neither store nor place chunks.

The server tests use the shared `kvreuse serve` of `conftest.py` (salted_only, a device tier of a
few chunks, then disk, then Redis), so a chunk stored by one tenant is looked up by another while it
sits in memory, after it was spilled to disk, and once only Redis still holds it.  vLLM's own
prefix cache is salted too, so a different tenant's `cached_tokens` must be exactly 0.
"""

from __future__ import annotations

import time

import pytest

from kvreuse.connector.config import ConnectorConfig, ConnectorConfigError
from kvreuse.store.config import parse_size
from tests.ops.ops_server import DEVICE_BYTES, DISK_BYTES
from tests.connector.test_e2e_server import ask, msgs, text


def test_isolation_option():
    assert ConnectorConfig.from_extra_config({}).isolation == "salt"
    assert ConnectorConfig().shares_chunks(None), "by default unsalted requests share one pool"
    strict = ConnectorConfig.from_extra_config({"isolation": "salted_only"})
    assert not strict.shares_chunks(None) and not strict.shares_chunks("")
    assert strict.shares_chunks("tenant-1")
    with pytest.raises(ConnectorConfigError, match="^isolation:"):
        ConnectorConfig.from_extra_config({"isolation": "strict"})


def _delta(after: dict, before: dict, name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


HITS = 'kvreuse_chunk_lookups_total{result="hit"}'
MISSES = 'kvreuse_chunk_lookups_total{result="miss"}'


@pytest.mark.slow
def test_unsalted_requests_neither_store_nor_place(ops_server):
    s = ops_server
    sys_, A, B = text(601, 40), text(602, 150), text(603, 150)
    before = s.metrics()
    ask(s, msgs(sys_, [A, B], text(604, 8)))
    out = ask(s, msgs(sys_, [B, A], text(605, 8)))
    after = s.metrics()
    assert out[2] == 0, f"an unsalted request reused {out[2]} tokens under salted_only"
    for name in ("kvreuse_saved_chunks_total", "kvreuse_reused_tokens_total", HITS, MISSES):
        assert _delta(after, before, name) == 0, f"{name} moved for unsalted requests"
    # salted requests on the same server still store and place; an unsalted one never sees their chunks
    # (C first: no unsalted request began with it, so vLLM's own prefix cache has nothing either)
    C = text(609, 150)
    ask(s, msgs(sys_, [A, C], text(606, 8)), cache_salt="tenant-1")
    same = ask(s, msgs(sys_, [C, A], text(607, 8)), cache_salt="tenant-1")
    assert same[2] >= 0.75 * same[3], f"salted reuse: only {same[2]}/{same[3]}"
    assert ask(s, msgs(sys_, [C, A], text(608, 8)))[2] == 0


def _saved_bytes(s) -> float:
    """KV bytes of new entries: each lands in the device tier first (lower tiers count their copies apart)."""
    return s.metrics().get('kvreuse_saved_bytes_total{tier="device"}', 0.0)


def _settled(s) -> dict:
    """/metrics once the worker reported what it did: its stats reach the scheduler with later steps
    (and store gauges at most once a second), so run two short unsalted requests (kvreuse-free) first."""
    for i in range(2):
        time.sleep(1.1)
        ask(s, [{"role": "user", "content": text(5000 + i, 4)}], max_tokens=1)
    return s.metrics()


def _fill(s, seed: int, nbytes: int) -> None:
    """Salted traffic of new documents until the store took `nbytes` more: pushes older entries down."""
    start = _saved_bytes(s)
    for i in range(256):  # the store drops saves when its ingest queue is full (a busy machine): keep pushing
        if _saved_bytes(s) - start >= nbytes:
            return
        docs = [text(seed + 10 * i + j, 150) for j in range(3)]
        ask(s, msgs(text(seed - 1, 40), docs, text(seed + 10 * i + 9, 8)), cache_salt="filler")
    raise AssertionError(f"256 requests saved less than {nbytes} bytes")


@pytest.mark.slow
def test_salts_never_share_chunks_on_any_tier(ops_server):
    s = ops_server
    sys_ = text(700, 40)
    pairs = {tier: (text(710 + 2 * i, 150), text(711 + 2 * i, 150)) for i, tier in enumerate(("disk", "redis"))}
    for A, B in pairs.values():
        ask(s, msgs(sys_, [A, B], text(720, 8)), cache_salt="tenant-a")

    def other_tenant_misses(A, B, q):   # a fresh tenant per probe: nothing of its own stored before
        m0 = s.metrics()
        out = ask(s, msgs(sys_, [B, A], text(q, 8)), cache_salt=f"tenant-b{q}")
        assert out[2] == 0, f"another tenant reused {out[2]} tokens of tenant-a's chunks"
        assert _delta(s.metrics(), m0, HITS) == 0

    def owner_reuses(A, B, q) -> dict:
        m0 = _settled(s)
        out = ask(s, msgs(sys_, [B, A], text(q, 8)), cache_salt="tenant-a")
        assert out[2] >= 0.75 * out[3], f"tenant-a reused only {out[2]}/{out[3]} of its own chunks"
        m1 = _settled(s)
        return {t: _delta(m1, m0, f'kvreuse_rehydrations_total{{tier="{t}"}}') for t in ("disk", "redis")}

    for i, (A, B) in enumerate(pairs.values()):      # in device memory
        other_tenant_misses(A, B, 730 + i)
    device, disk = parse_size(DEVICE_BYTES), parse_size(DISK_BYTES)
    _fill(s, 1000, device + device // 4)             # past the device budget, well within the disk's
    other_tenant_misses(*pairs["disk"], 740)
    rehydrated = owner_reuses(*pairs["disk"], 741)
    _fill(s, 2000, 2 * (device + disk))              # past device + disk budgets: only Redis keeps them
    other_tenant_misses(*pairs["redis"], 750)
    rehydrated = {t: n + rehydrated[t] for t, n in owner_reuses(*pairs["redis"], 751).items()}
    assert rehydrated["disk"] > 0 and rehydrated["redis"] > 0, f"tenant-a's chunks came back from {rehydrated}"
