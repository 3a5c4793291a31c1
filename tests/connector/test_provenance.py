"""Provenance on the scheduler side: approximate KV never reaches a request (or vLLM's prefix cache under
plain block hashes) that did not accept it.  Each test fails on a planner that labels KV by plan alone."""

from __future__ import annotations

from kvreuse.connector.claim import context_signature
from kvreuse.connector.fidelity import tainted
from tests.connector.test_scheduler_side import BS, Req, msg, run_to_end, sched_out, side

EXACT = {"kvreuse": {"fidelity": "exact"}}


def _keys_of(s, r, part: list[int], offset: int) -> set[bytes]:
    st = s.reqs[r.request_id]
    return {k for c, k in zip(st.chunks, st.keys) if offset <= c.start and c.end <= offset + len(part)}


def test_a_save_after_approximate_kv_is_never_planned_exact():
    """A = [X,P,C,Q] places P as survival and saves C; a strict request then computes P after X; B = [X,P,C,D],
    strict, must not place C (its KV was computed after approximate P)."""
    s = side("fast")
    X, Y, P, C = msg(1, 100), msg(2, 100), msg(3, 100), msg(4, 100)
    run_to_end(s, Req("prime", X + Y + P + msg(5, 5)))
    a = Req("a", X + P + C + msg(6, 5))
    run_to_end(s, a)
    st = s.reqs["a"]
    assert st.approximate_from() is not None and st.approximate_from() < len(X + P)  # P: survival
    c_keys = _keys_of(s, a, C, len(X + P))
    assert c_keys and all(k in s.directory for k in c_keys)                          # C saved
    run_to_end(s, Req("strict", X + P + msg(7, 5), kv_transfer_params=EXACT))        # P computed after X
    b = Req("b", X + P + C + msg(8, 5), kv_transfer_params=EXACT)
    s.matched(b, 0)
    plan = s.reqs["b"].plan
    assert {it.policy for it in plan.items} <= {"exact"} and plan.first_approximate is None
    assert not ({it.key for it in plan.items} & c_keys), "C's KV came after approximate KV: not exact"
    # a request that accepts approximate KV still finds C, recorded under the tainted signature
    for j, (c, k) in enumerate(zip(st.chunks, st.keys)):
        if k in c_keys:
            ctx = s.directory.get(k).contexts
            assert context_signature(st.keys[:j]) not in ctx and tainted(context_signature(st.keys[:j])) in ctx
    fast = Req("f", X + P + C + msg(9, 5))
    s.matched(fast, 0)
    assert {it.key for it in s.reqs["f"].plan.items} & c_keys


def test_demoted_entries_are_planned_as_recall_never_exact():
    s = side("fast")
    A, B = msg(10, 100), msg(11, 100)
    run_to_end(s, Req("r1", A + B + msg(12, 5)))
    r = Req("r2", A + B + msg(13, 5))
    s.matched(r, 0)
    assert {it.policy for it in s.reqs["r2"].plan.items} == {"exact"}
    b_keys = _keys_of(s, r, B, len(A))
    s.demoted(list(b_keys))                       # the store now holds B's in-context KV as base + patch
    fast = Req("r3", A + B + msg(14, 5))
    s.matched(fast, 0)
    pol = {it.key: it.policy for it in s.reqs["r3"].plan.items}
    assert all(pol.get(k) == "recall" for k in b_keys)
    assert s.reqs["r3"].plan.first_approximate == len(A) or s.reqs["r3"].plan.first_approximate >= len(A)
    strict = Req("r4", A + B + msg(14, 5), kv_transfer_params=EXACT)
    s.matched(strict, 0)
    assert not ({it.key for it in s.reqs["r4"].plan.items} & b_keys)
    assert s.reqs["r4"].plan.first_approximate is None and strict.block_hashes == Req("x", strict.prompt_token_ids).block_hashes


def test_a_preempted_request_gets_plain_block_hashes_back():
    s = side("fast")
    A, B = msg(20, 100), msg(21, 100)
    run_to_end(s, Req("r1", A + B + msg(22, 5)))
    r = Req("r2", msg(23, 50) + B + msg(24, 5))      # B after other text: approximate
    plain = list(r.block_hashes)
    s.matched(r, 0)
    salted = list(r.block_hashes)
    k = s.reqs["r2"].plan.first_approximate // BS
    assert salted[:k] == plain[:k] and all(x != y for x, y in zip(salted[k:], plain[k:]))
    # vLLM preempts it: before its next prefix-cache lookup its hashes are vLLM's own again
    out = sched_out([], {})
    out.preempted_req_ids = {"r2"}
    s.build_meta(out, lambda rid: list(range(64)))
    assert r.block_hashes == plain
    s.matched(r, 0)                                    # resumed: planned again at its own fidelity
    assert r.block_hashes == salted


def test_salted_hashes_differ_by_fidelity_and_chain_from_where_salting_starts():
    A, B, q = msg(30, 100), msg(31, 100), msg(32, 5)
    hashes = {}
    for fid in ("fast", "accurate"):
        s = side(fid, repair_tokens=0)
        run_to_end(s, Req("r1", A + B + q))
        r = Req("r2", msg(33, 50) + B + q)
        s.matched(r, 0)
        hashes[fid] = (list(r.block_hashes), s.reqs["r2"].plan.first_approximate // BS)
    (hf, kf), (ha, ka) = hashes["fast"], hashes["accurate"]
    assert kf == ka and hf[:kf] == ha[:kf] and all(x != y for x, y in zip(hf[kf:], ha[kf:]))


def test_accurate_recomputes_the_first_tokens_of_each_moved_chunk():
    A, B, C, q = msg(40, 100), msg(41, 100), msg(42, 100), msg(43, 5)
    plans = {}
    for fid, repair in (("fast", 16), ("accurate", 16), ("accurate", 0)):
        s = side(fid, repair_tokens=repair)
        run_to_end(s, Req("r1", A + B + C + q))
        r = Req("r2", msg(44, 40) + C + B + q)         # reordered after new text: every placed chunk moved
        s.matched(r, 0)
        plans[fid, repair] = s.reqs["r2"].plan
    fast, acc, acc0 = plans["fast", 16], plans["accurate", 16], plans["accurate", 0]
    assert acc0.placed_tokens == fast.placed_tokens          # no repair: what fast places
    assert 0 < acc.placed_tokens < fast.placed_tokens
    placed = lambda plan: {t for it in plan.items for t in range(it.dst_start, it.dst_end)}  # noqa: E731
    c_at, b_at = 41, 41 + len(C)   # where C and B start here, after other text than they were stored after
    for at in (c_at, b_at):
        assert at in placed(fast) and at + 20 in placed(fast)
        assert not placed(acc) & set(range(at, at + 16)) and at + 20 in placed(acc)  # their sinks computed
    # inside each passage a chunk still follows the chunk it was stored after: placed whole
    assert any(it.src_start == 0 and it.policy != "exact" for it in acc.items)
    # repair_scope "every": the first tokens of every approximate chunk are computed, moved or not
    s = side("accurate", repair_tokens=16, repair_scope="every")
    run_to_end(s, Req("r1", A + B + C + q))
    r = Req("r2", msg(44, 40) + C + B + q)
    s.matched(r, 0)
    every = s.reqs["r2"].plan
    assert every.items and all(it.src_start >= 16 for it in every.items if it.policy != "exact")
    assert every.placed_tokens < acc.placed_tokens


def test_accurate_repairs_a_count_of_tokens_from_each_change_point_across_chunks():
    """The repair is `repair_tokens` tokens from where the context changed, whatever the chunk sizes: a first
    chunk shorter than it is computed whole and the rest comes from the chunk after it, which follows the very
    chunk it was stored after and so is no change point of its own (a rule per chunk computed less)."""
    repair = 40
    A, B, q = msg(60, 100), msg(61, 150), msg(62, 5)
    s = side("accurate", repair_tokens=repair)
    run_to_end(s, Req("r1", A + B + q))
    first = next(c for c in s.reqs["r1"].chunks if c.start == len(A))
    assert first.num_tokens < repair                      # B opens with a chunk shorter than the repair
    X = msg(63, 30)
    r = Req("r2", X + B + msg(64, 5))                     # B after text it was not stored after
    s.matched(r, 0)
    plan = s.reqs["r2"].plan
    placed = {t for it in plan.items for t in range(it.dst_start, it.dst_end)}
    at = len(X)
    assert not placed & set(range(at, at + repair))       # the repair: `repair` tokens, across two chunks
    assert set(range(at + repair, at + len(B))) <= placed  # and nothing more of B
    assert "exact" not in {it.policy for it in plan.items}


def test_the_response_says_what_the_request_was_served():
    s = side("fast")
    A, B = msg(50, 100), msg(51, 100)
    run_to_end(s, Req("r1", A + B + msg(52, 5)))
    r = Req("r2", A + msg(53, 30) + B + msg(54, 5))
    run_to_end(s, r)
    got = s.finished(r)["kvreuse"]
    assert got["fidelity"] == "fast"
    assert got["placed_tokens"]["exact"] >= 64 and got["placed_tokens"]["approximate"] >= 64
    assert got["computed_after_approximate_tokens"] > 0
    strict = Req("r3", A + msg(53, 30) + B + msg(54, 5), kv_transfer_params=EXACT)
    run_to_end(s, strict)
    got = s.finished(strict)["kvreuse"]
    assert got["fidelity"] == "exact" and got["placed_tokens"]["approximate"] == 0
    assert s.finished(Req("r4", A, kv_transfer_params={"kvreuse": False})) is None
