"""The scheduler side without vLLM: segment advance and cap, block-hash salting, per-request state."""

from __future__ import annotations

from kvreuse.connector.config import ConnectorConfig
from kvreuse.connector.scheduler import SchedulerSide
from tests.support.sched_requests import SchedRequest, message, run_to_end, sched_out  # noqa: F401 (tests import them here)

START = 2
BS = 16


def Req(request_id: str, prompt: list[int], **kw) -> SchedRequest:
    return SchedRequest(request_id, prompt, hash_block=BS, **kw)


def side(fidelity: str = "fast", repair_tokens: int = 16, repair_scope: str = "moved", **cost) -> SchedulerSide:
    cfg = ConnectorConfig.from_extra_config({"chunking": {"min_tokens": 16, "avg_tokens": 32, "max_tokens": 64},
                                            "policy": {"fidelity": fidelity, "repair_tokens": repair_tokens,
                                                       "repair_scope": repair_scope},
                                            "cost": {"learn": False, "step_overhead_s": 0.0, **cost}})
    s = SchedulerSide(cfg, b"m" * 16, frozenset({START}), block_size=BS)
    s.segmented = True
    return s


def msg(seed: int, n: int) -> list[int]:
    return message(seed, n, START)


def test_segments_advance_and_cap_like_the_scheduler():
    s = side()
    A, B, C = msg(1, 120), msg(2, 120), msg(3, 120)
    run_to_end(s, Req("r1", A + B + C + msg(4, 5)))
    prompt = msg(5, 40) + B + msg(6, 30) + A + msg(7, 20) + C + msg(8, 5)
    r = Req("r2", prompt)
    loads = run_to_end(s, r)
    placed = sum(b - a for a, b in loads)
    assert placed >= 3 * 100, loads
    for a, b in loads:  # every placed range holds tokens of a stored passage, at its place in this prompt
        assert any(any(prompt[a:b] == m[i:i + b - a] for i in range(len(m))) for m in (A, B, C))
    st = s.reqs["r2"]
    assert len(st.used) == 3 and not st.prefill.pending


def test_state_is_freed_on_finish_and_abort():
    s = side()
    base = msg(10, 200)
    run_to_end(s, Req("warm", base + msg(11, 3)))
    s.finished(Req("warm", []))
    for i in range(300):  # many requests planned, then aborted before they finish
        r = Req(f"a{i}", msg(100 + i, 20) + base + msg(12, 3))
        s.after_alloc(r, s.matched(r, 0))
        s.advance(r)
        s.finished(r)
    assert s.reqs == {} and s.modalities == {}


def test_approximate_placements_salt_block_hashes_from_their_block():
    s = side()
    A, B = msg(20, 100), msg(21, 100)
    run_to_end(s, Req("r1", A + B + msg(22, 5)))
    r = Req("r2", msg(23, 50) + B + msg(24, 5))   # B now follows other text: not exact
    orig = list(r.block_hashes)
    s.matched(r, 0)
    plan = s.reqs["r2"].plan
    first = plan.first_approximate
    assert first is not None
    k = first // BS
    assert r.block_hashes[:k] == orig[:k] and all(x != y for x, y in zip(r.block_hashes[k:], orig[k:]))
    again = list(r.block_hashes)
    s.matched(r, 0)                                    # idempotent: planning again changes nothing
    assert r.block_hashes == again
    exact = Req("r3", A + B + msg(25, 5))              # the same passages in the same order: exact
    eh = list(exact.block_hashes)
    s.matched(exact, 0)
    assert exact.block_hashes == eh


def test_opted_out_and_unsalted_under_salted_only_plan_nothing():
    s = side()
    A = msg(30, 200)
    run_to_end(s, Req("r1", A + msg(31, 3)))
    out = Req("r2", msg(32, 20) + A + msg(33, 3), kv_transfer_params={"kvreuse": False})
    assert s.matched(out, 0) == 0 and "r2" not in s.reqs


def test_a_prompt_logprobs_request_places_nothing_and_is_saved():
    """vLLM's `skip_reading_prefix_cache` (set for prompt logprobs): every prompt token computed, the chunks saved."""
    s = side()
    A, B, tail = msg(35, 150), msg(36, 150), msg(37, 5)
    run_to_end(s, Req("r1", A + B + tail))
    r = Req("r2", msg(38, 30) + B + A + tail)
    r.skip_reading_prefix_cache = True
    metas = []
    assert run_to_end(s, r, metas=metas) == []
    assert s.reqs["r2"].plan.placements == [] and r.block_hashes == Req("x", r.prompt_token_ids).block_hashes
    assert [sv for m in metas for sv in m.saves], "its computed chunks are saved"
    again = Req("r3", r.prompt_token_ids)   # the same prompt without prompt logprobs: placed
    assert run_to_end(s, again)


def test_a_request_planned_but_not_allocated_is_looked_up_again_under_plain_hashes():
    """vLLM could not allocate a planned request's blocks this step: at the next lookup its hashes are plain, so
    vLLM's prefix cache cannot hand it other requests' approximate blocks (salted alike) as a prefix hit."""
    s = side()
    A, B = msg(26, 100), msg(27, 100)
    run_to_end(s, Req("r1", A + B + msg(28, 5)))
    r = Req("r2", msg(29, 50) + B + msg(24, 5))
    plain = list(r.block_hashes)
    s.matched(r, 0)
    assert s.reqs["r2"].plan.first_approximate is not None and r.block_hashes != plain
    s.build_meta(sched_out([], {}), lambda rid: [])        # a step that did not schedule it
    assert r.block_hashes == plain
    s.after_alloc(r, s.matched(r, 0))                       # planned (and salted) again, then allocated
    s.build_meta(sched_out([r], {"r2": 10}), lambda rid: list(range(8)))
    assert r.block_hashes != plain


def test_a_seeded_request_is_not_split_where_vllm_cannot_rewind_its_generator():
    from vllm import SamplingParams   # its own sampling type decides whether it has a generator

    s = side()
    A, B, tail = msg(43, 150), msg(44, 150), msg(45, 5)
    run_to_end(s, Req("r1", A + B + tail))
    prompt = msg(46, 30) + B + A + tail
    seeded = SamplingParams(seed=7, temperature=0.8)
    s.split_seeded = False                                  # the CPU platform
    r = Req("r2", prompt)
    r.sampling_params = seeded
    assert run_to_end(s, r) == []                           # nothing after computed text: one prefill step
    greedy = Req("r3", prompt)
    greedy.sampling_params = SamplingParams(seed=7, temperature=0.0)
    assert run_to_end(s, greedy)
    s.split_seeded = True
    r = Req("r4", prompt)
    r.sampling_params = seeded
    assert run_to_end(s, r)


def test_a_request_may_ask_for_exact_on_a_server_that_places_blind():
    s = side()   # policy.fidelity "fast"
    A, B, tail = msg(40, 100), msg(41, 100), msg(42, 5)
    run_to_end(s, Req("a", A + tail))
    run_to_end(s, Req("b", B + tail))           # B stored alone: it never followed A
    anyone = Req("r1", A + B + tail)
    s.matched(anyone, 0)
    assert "blind" in {it.policy for it in s.reqs["r1"].plan.items}
    strict = {"kvreuse": {"fidelity": "exact"}}
    metas = []
    run_to_end(s, Req("r2", A + B + tail, kv_transfer_params=strict), metas=metas)
    loads = [ld for m in metas for ld in m.loads]
    assert loads and all(ld.fidelity == "exact" for ld in loads)   # the worker refuses other KV for it too
    assert {it.policy for ld in loads for it in ld.items} == {"exact"}   # A placed, B computed
    captured = [it for m in metas for sv in m.saves for it in sv.items if not it.is_new]
    assert captured   # B's chunks computed after A: their KV in this context is saved (a patch is fitted)
    again = Req("r3", A + B + tail, kv_transfer_params=strict)
    s.matched(again, 0)   # now B is stored in this context too: exact
    plan = s.reqs["r3"].plan
    assert {it.policy for it in plan.items} == {"exact"} and len(plan.items) > sum(len(ld.items) for ld in loads)


def test_a_failed_load_undoes_the_dropped_save_and_the_recompute_is_saved():
    s = side()
    A, C = msg(30, 120), msg(31, 120)
    run_to_end(s, Req("r1", A + C + msg(32, 5)))
    X, Y, q = msg(33, 60), msg(34, 60), msg(35, 5)
    prompt = X + A + Y + C + q
    r = Req("r2", prompt)
    metas: list = []
    run_to_end(s, r, metas=metas)
    st = s.reqs["r2"]
    last = st.used[-1]
    assert last.start >= len(X + A + Y) - 16 and metas[-1].loads and metas[-1].saves
    saved_new = [it.key for it in metas[-1].saves[0].items if it.is_new]
    assert saved_new and all(k in s.directory for k in saved_new)
    # the last step's load of C failed on the worker: vLLM rolled r2 back to the failed block, the
    # worker dropped the step's save (it attended to blocks never written) and reported both
    r.num_computed_tokens = last.start // BS * BS
    s.lost([last.items[0].key])
    s.load_failed(["r2"])
    s.unsaved(["r2"])
    assert not any(k in s.directory for k in saved_new), "the dropped save must not stay claimable"
    assert not ({it.key for it in last.items} & st.placed)
    # the recompute: C's chunks are computed in this prompt now and saved with the rest
    n = len(prompt)
    new = n - r.num_computed_tokens
    meta = s.build_meta(sched_out([r], {"r2": new}), lambda rid: list(range(64)))
    keys = {it.key for it in meta.saves[0].items}
    assert set(saved_new) <= keys and {it.key for it in last.items} & keys
