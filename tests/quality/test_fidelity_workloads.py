"""The fidelity workloads (`bench/fidelity/workloads.py`) and comparison (`bench/fidelity/compare.py`),
without a server: seeded (a longer run begins with a shorter one's requests), every gold fact stated in its
own prompt, no text shared between workloads, and the drift figures zero on identical answers and positive
on differing ones."""

from __future__ import annotations

import math

import pytest

from bench.fidelity.compare import answer_drift, drift_at, p99
from bench.fidelity.workloads import WORKLOADS, Request

N = 12


def _body(r: Request) -> str:
    return "\n".join(m["content"] for m in r.messages) if r.messages else r.text


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_seeded_and_answerable(name):
    reqs = WORKLOADS[name](N, seed=3)
    assert len(reqs) == N and [r.index for r in reqs] == list(range(N))
    assert reqs == WORKLOADS[name](N, seed=3)
    assert reqs != WORKLOADS[name](N, seed=4)
    assert WORKLOADS[name](N + 7, seed=3)[:N] == reqs  # a longer run starts with the same requests
    for r in reqs:
        assert r.gold in _body(r), (r.gold, _body(r))  # the fact is in the prompt ...
        assert r.gold not in r.prime                   # ... and not given away by the primer
        assert r.correct(" " + r.gold + ".") and not r.correct(" nothing")


def test_workloads_share_no_passages():
    seen: dict[str, str] = {}
    for name, make in WORKLOADS.items():
        for r in make(N, seed=0):
            for para in _body(r).split("\n\n"):
                if len(para) > 80:
                    assert seen.setdefault(para, name) == name, f"{name} and {seen[para]} share {para[:60]!r}"


def test_shapes_of_the_window_and_turn_workloads():
    raw = WORKLOADS["agent_raw"](6)
    obs = [[p for p in r.text.split("\n\n") if p.startswith("Observation")] for r in raw]
    assert all(len(o) == 4 for o in obs) and all(a[1:] == b[:3] for a, b in zip(obs, obs[1:]))
    chat = WORKLOADS["agent_chat"](6)
    assert all(len(r.messages) == 6 for r in chat)  # system, 4 observations, question
    turns = WORKLOADS["multiturn"](8)
    for a, b in zip(turns, turns[1:]):
        if len(b.messages) > len(a.messages):  # the next turn resends this one with its gold reply
            k = len(a.messages)
            assert b.messages[:k] == a.messages and a.gold in b.messages[k]["content"]
    reo = WORKLOADS["reorder"](8)
    cards = [sorted(r.messages[1]["content"].split("\n\n")[:4]) for r in reo]
    assert cards[0] == cards[3] and cards[3] != cards[4]  # a set asked 4 times, then the next set


def _ans(tokens, tops):
    return {"tokens": tokens, "tops": tops}


def test_drift():
    ref = _ans([" a", " b"], [{" a": -0.1, " x": -2.5}, {" b": -0.2, " y": -1.9}])
    assert drift_at(ref, ref, 0) == (0.0, 0.0) and answer_drift(ref, ref) == 0.0
    other = _ans([" a", " y"], [{" a": -0.3, " x": -1.5}, {" y": -0.5, " b": -0.9}])
    d, kl = drift_at(other, ref, 0)
    assert math.isclose(d, 0.2) and kl > 0
    assert math.isclose(answer_drift(other, ref), 0.7)  # up to and including the token where they part
    missing = _ans([" z"], [{" z": -0.1, " w": -3.0}])  # the reference's token outside the top 5: its floor
    assert math.isclose(drift_at(missing, ref, 0)[0], 2.9)
    assert p99([3.0, 1.0, 2.0]) == 3.0
