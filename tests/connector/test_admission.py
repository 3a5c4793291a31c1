"""Adaptive admission: when nothing recurs, first-seen chunks are not saved; recurrence turns saving back on."""

from __future__ import annotations

import tracemalloc

import pytest

from kvreuse.connector.admission import Recurrence
from kvreuse.connector.config import ConnectorConfig, ConnectorConfigError
from kvreuse.connector.segment import Chunk
from kvreuse.connector.scheduler import SchedulerSide
from tests.connector.test_scheduler_side import BS, START, Req, msg, sched_out


def chunks_of(n: int, size: int = 16) -> list[Chunk]:
    return [Chunk(i, min(i + size, n)) for i in range(0, n, size)]


def keys_of(tag: int, n: int) -> list[bytes]:
    return [tag.to_bytes(4, "little") + i.to_bytes(4, "little") + b"k" * 8 for i in range(n)]


def test_unique_traffic_turns_cold_after_a_full_window_and_recurrence_turns_it_back():
    r = Recurrence(window=4, min_share=0.05)
    ch = chunks_of(64)
    for t in range(3):
        assert r.observe(ch, keys_of(t, 4)) == [False] * 4
        assert not r.cold  # a fresh server saves everything until a window is seen
    r.observe(ch, keys_of(3, 4))
    assert r.cold and r.share == 0.0
    # one request of which half was seen before: 32 of 256 tokens in the window recur (>= 5%)
    seen = r.observe(ch, keys_of(0, 2) + keys_of(9, 2))
    assert seen == [True, True, False, False]
    assert not r.cold and r.share == pytest.approx(32 / 256)
    for t in range(10, 14):
        r.observe(ch, keys_of(t, 4))
    assert r.cold


def test_tokens_of_vllms_prefix_hit_do_not_count():
    r = Recurrence(window=2, min_share=0.05)
    system = keys_of(99, 2)  # a system prompt every request starts with, served by vLLM's prefix cache
    for t in range(6):
        r.observe(chunks_of(128), system + keys_of(t, 6), skip_tokens=32)
    assert r.cold  # the rest never recurs
    r2 = Recurrence(window=2, min_share=0.05)
    for t in range(6):
        r2.observe(chunks_of(128), system + keys_of(t, 6), skip_tokens=0)
    assert not r2.cold  # counted, the system prompt alone is 25% recurrence


def test_stored_keys_count_as_seen():
    r = Recurrence(window=1)
    ks = keys_of(5, 3)
    assert r.observe(chunks_of(48), ks, stored=lambda k: k == ks[1]) == [False, True, False]


def test_memory_is_bounded_by_capacity():
    r = Recurrence(window=8, capacity=4096)
    ch = chunks_of(1024)
    for t in range(64):  # warm the structures to their bound
        r.observe(ch, keys_of(t, 64))
    tracemalloc.start()
    for t in range(64, 1064):  # every key held now was allocated under tracing
        r.observe(ch, keys_of(t, 64))
    held = tracemalloc.get_traced_memory()[0]
    for t in range(1064, 3064):  # 128,000 more keys
        r.observe(ch, keys_of(t, 64))
    grown = tracemalloc.get_traced_memory()[0] - held
    tracemalloc.stop()
    assert len(r._order) == 4096 and len(r._count) <= 4096
    assert held < 2 << 20 and grown < 64 * 1024, (held, grown)


def side(**policy) -> SchedulerSide:
    cfg = ConnectorConfig.from_extra_config({"chunking": {"min_tokens": 16, "avg_tokens": 32, "max_tokens": 64},
                                            "cost": {"learn": False, "step_overhead_s": 0.0},
                                            "policy": {"admission_window": 4, "fidelity": "fast", **policy}})
    s = SchedulerSide(cfg, b"m" * 16, frozenset({START}), block_size=BS)
    s.segmented = True
    return s


def prefill(s: SchedulerSide, rid: str, prompt: list[int]):
    """Plan and compute a request's whole prompt in one step; the save items of that step."""
    r = Req(rid, prompt)
    s.after_alloc(r, s.matched(r, 0))
    r.num_computed_tokens = s.reqs[rid].plan.leading
    meta = s.build_meta(sched_out([r], {rid: len(prompt) - r.num_computed_tokens}), lambda _: list(range(64)))
    s.finished(r)
    return [it for sv in meta.saves for it in sv.items]


def test_the_scheduler_defers_first_seen_chunks_while_nothing_recurs():
    s = side(admission_min_share=0.9)  # stays cold through the recurring requests below
    for i in range(3):  # until a window of requests (this one included) is seen, each is saved whole
        assert prefill(s, f"u{i}", msg(100 + i, 200))
    assert s.take_stats().deferred_saves == 0
    doc = msg(7, 200)
    assert prefill(s, "first", doc + msg(8, 40)) == []  # cold: nothing new saved
    assert s.take_stats().deferred_saves > 0
    # its second occurrence: the chunks seen before are saved, the first-seen ones before it are not
    again = prefill(s, "second", msg(9, 30) + doc)
    assert s.recurrence.cold and again and {it.start for it in again} <= set(range(30, 230))
    stored = {it.key for it in again}
    # and placed from the third occurrence on
    r = Req("third", msg(10, 50) + doc)
    s.matched(r, 0)
    placed = {k for p in s.reqs["third"].plan.placements for k in p.keys}
    assert placed and placed <= stored


def test_recurrence_turns_saving_of_first_seen_chunks_back_on():
    s = side()
    for i in range(4):
        prefill(s, f"u{i}", msg(100 + i, 200))
    doc = msg(7, 200)
    assert prefill(s, "first", doc + msg(8, 40)) == []
    again = prefill(s, "second", msg(9, 30) + doc)  # ~87% of its tokens recur: no longer cold
    assert not s.recurrence.cold and min(it.start for it in again) == 0


def test_always_saves_every_new_chunk():
    s = side(admission="always")
    for i in range(12):
        assert prefill(s, f"u{i}", msg(100 + i, 200))
    assert s.recurrence is None and s.take_stats().deferred_saves == 0


def test_admission_config_is_checked():
    for bad, key in (({"admission": "never"}, "policy.admission"), ({"admission_window": 0}, "policy.admission_window"),
                     ({"admission_min_share": 1.5}, "policy.admission_min_share")):
        with pytest.raises(ConnectorConfigError, match=key):
            ConnectorConfig.from_extra_config({"policy": bad})


def test_at_exact_a_sliding_window_turns_cold_and_saves_nothing_it_could_not_place():
    """At fidelity "exact" a chunk recurs only after the same chunks: a window sliding by one passage repeats
    every passage but never a passage's context, so once a window of requests is seen its saves stop, stored
    passages in new contexts included (under "fast" the passages recur and every save goes on); a conversation
    that repeats its whole history recurs in context, keeps saving, and is placed."""
    passages = [msg(200 + i, 64) for i in range(12)]
    saved: dict[str, list] = {}
    for fidelity in ("exact", "fast"):
        s = side(fidelity=fidelity)
        saved[fidelity] = [prefill(s, f"w{t}", [x for p in passages[t:t + 4] for x in p] + msg(300 + t, 20))
                           for t in range(8)]
        if fidelity == "exact":
            assert all(saved["exact"][:3]) and s.recurrence.cold
            assert not any(saved["exact"][3:]) and s.take_stats().deferred_saves > 0
            history = [msg(400, 200)]
            for t in range(4):  # each turn repeats the whole conversation so far: it recurs in context
                history.append(history[-1] + msg(500 + t, 40))
                prefill(s, f"c{t}", history[-1])
            assert not s.recurrence.cold
            r = Req("c-next", history[-1] + msg(600, 40))
            s.matched(r, 0)
            assert s.reqs["c-next"].plan.placed_tokens >= len(history[-2])
    assert all(saved["fast"])
