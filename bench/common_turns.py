"""Multi-turn traces replayed turn by turn, and the per-turn figures the agent benches report.

Two ways to replay, one per pair of benches:
  * `replay` — one server (one arm) at a time, a fresh one per repeat (`serve_common.alternate_arms`),
    the server's counters settled after every turn, so each turn has its own metrics delta
    (bench/raw_agent_bench.py, bench/caption_bench.py; figures: `agent_turn`, `from_turn2`, `spreads`);
  * `interleave` — every arm live at once (one server per arm, or one server whose requests opt out),
    each turn sent to every arm before the next, replay 0 a warm-up (bench/ttft_bench.py,
    bench/mm_bench.py; figures: `interleaved_turns`).
Each turn's row holds at least `ttft_s` (seconds to the first streamed token) and `prompt_tokens`.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

from bench.common_table import Col
from bench.serve_common import ARMS, Server, delta, median, ratio, reuse_summary, settle

# per arm: one list of turn rows per repeat
AgentRuns = dict[str, list[list[dict]]]
TTFT_COLS = (Col("TTFT ms kvreuse", 15, ".1f"), Col("prefix", 8, ".1f"), Col("ratio", 6, ".2f"))


def openai_client(url: str):
    """An OpenAI client of the server at `url` (its `/v1`), patient with a slow CPU prefill."""
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key="unused", timeout=600)


def stream_completion(client, model: str, prompt: str, max_tokens: int = 4) -> tuple[float, int, int]:
    """(seconds to first token, prompt tokens, cached tokens) of one streamed `/v1/completions` request."""
    t0 = time.perf_counter()
    first, usage = None, None
    for ev in client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                        stream=True, stream_options={"include_usage": True}):
        if first is None and ev.choices and ev.choices[0].text:
            first = time.perf_counter() - t0
        if ev.usage is not None:
            usage = ev.usage
    details = getattr(usage, "prompt_tokens_details", None)
    cached = (details.cached_tokens or 0) if details else 0
    return (first if first is not None else time.perf_counter() - t0), usage.prompt_tokens, cached


def kvreuse_stats(url: str) -> None:
    """Print `kvreuse stats` of the server at `url` (what its /metrics counted over the whole run)."""
    subprocess.run([sys.executable, "-m", "kvreuse.cli", "stats", url], check=False)


# ------------------------------------------------------------------ one arm at a time
def replay(server: Server, send: Callable[[Any], tuple[float, int, int]], trace: Sequence, warm: Sequence,
           fields: Callable[[dict[str, float]], dict] | None = None,
           snapshot: Callable[[], dict[str, float]] | None = None) -> list[dict]:
    """Send `warm`, then each turn of `trace` through `send(turn) -> (TTFT s, prompt tokens, cached tokens)`,
    the counters (`snapshot()`, default the server's settled /metrics) read after each.  One row per turn:
    `ttft_s`, `prompt_tokens`, `cached_tokens`, then `fields(d)` and `reuse_summary(d)` of the turn's delta `d`."""
    snapshot = snapshot or (lambda: settle(server.url))
    for turn in warm:
        send(turn)
    before = snapshot()
    rows = []
    for turn in trace:
        s, prompt, cached = send(turn)
        after = snapshot()
        d = delta(after, before)
        before = after
        rows.append({"ttft_s": s, "prompt_tokens": prompt, "cached_tokens": cached, **(fields(d) if fields else {}),
                     **reuse_summary(d)})
    return rows


def turn_median(reps: list[list[dict]], t: int, key: str) -> float | None:
    """Median over repeats of turn `t`'s `key`."""
    return median(r[t][key] for r in reps)


def turn_share(reps: list[list[dict]], t: int, key: str) -> float | None:
    """Median over repeats of turn `t`'s `key` per prompt token."""
    return median(r[t][key] / r[t]["prompt_tokens"] for r in reps)


def agent_turn(runs: AgentRuns, t: int) -> dict:
    """Turn `t` (0-based) as both agent benches report it: prompt tokens, median TTFT per arm and their ratio,
    kvreuse's placed share, and its claims by policy and segments in the last repeat."""
    k, p = (turn_median(runs[arm], t, "ttft_s") for arm in ARMS)
    last = runs["kvreuse"][-1][t]
    return {"turn": t + 1, "prompt_tokens": turn_median(runs["kvreuse"], t, "prompt_tokens"),
            "ttft_ms": {"kvreuse": 1e3 * k, "prefix": 1e3 * p}, "ttft_ratio": ratio(k, p),
            "placed_share": turn_share(runs["kvreuse"], t, "reused_tokens"),
            "claims_by_policy_last_repeat": last["claims_by_policy"], "segments_last_repeat": last["segments"]}


def ttft_cells(row: dict) -> list:
    """An `agent_turn` row's values under `TTFT_COLS`."""
    return [row["ttft_ms"]["kvreuse"], row["ttft_ms"]["prefix"], row["ttft_ratio"]]


def segments_cell(row: dict) -> str:
    """Segments placed / computed of an `agent_turn` row."""
    s = row["segments_last_repeat"]
    return f"{s.get('placed', 0)}/{s.get('computed', 0)}"


def claims_cell(row: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in row["claims_by_policy_last_repeat"].items()) or "-"


def from_turn2(runs: AgentRuns, table: list[dict]) -> dict:
    """From turn 2 on: the median of the per-turn TTFT ratios, and kvreuse's placed share (turns 2+ of a repeat
    together, median over repeats); {} for a one-turn trace."""
    if len(table) < 2:
        return {}
    later = range(1, len(table))
    return {"median_ttft_ratio_from_turn2": ratio_from_turn2(table),
            "placed_share_from_turn2": median(sum(r[t]["reused_tokens"] for t in later) /
                                              sum(r[t]["prompt_tokens"] for t in later) for r in runs["kvreuse"])}


def ratio_from_turn2(table: list[dict]) -> float | None:
    """The median of the per-turn TTFT ratios (`ttft_ratio`) from turn 2 on; None for a one-turn trace."""
    return median(row["ttft_ratio"] for row in table[1:])


def turn_spread(runs: AgentRuns, turns: range) -> dict:
    """TTFT over every (repeat, turn) of `turns`, per arm: mean, p50 and p99 in ms, and kvreuse / prefix of each
    (the per-turn medians hide a slow outlier; this is what a user of the trace sees)."""
    out: dict = {}
    for arm, reps in runs.items():
        xs = sorted(1e3 * r[t]["ttft_s"] for r in reps for t in turns if t < len(r))
        if xs:
            out[arm] = {"mean_ms": statistics.mean(xs), "p50_ms": statistics.median(xs),
                        "p99_ms": xs[min(len(xs) - 1, round(0.99 * (len(xs) - 1)))], "n": len(xs)}
    if "kvreuse" in out and "prefix" in out:
        out["ratio"] = {k: out["kvreuse"][k] / out["prefix"][k] for k in ("mean_ms", "p50_ms", "p99_ms")}
    return out


def print_spread(label: str, spread: dict) -> None:
    r = spread.get("ratio")
    if r:
        print(f"{label}: TTFT kvreuse / prefix mean {r['mean_ms']:.2f}, p50 {r['p50_ms']:.2f}, p99 {r['p99_ms']:.2f} "
              f"(kvreuse {spread['kvreuse']['mean_ms']:.1f} / {spread['kvreuse']['p99_ms']:.1f} ms mean / p99, "
              f"prefix {spread['prefix']['mean_ms']:.1f} / {spread['prefix']['p99_ms']:.1f}; "
              f"{spread['kvreuse']['n']} requests an arm)")


def spreads(runs: AgentRuns, turns: int) -> dict:
    """`turn_spread` of turn 1 and of turns 2+ (`turn1`, `from_turn2`), printed."""
    out = {"turn1": turn_spread(runs, range(0, 1)), "from_turn2": turn_spread(runs, range(1, turns))}
    print_spread("turn 1", out["turn1"])
    print_spread("from turn 2 (every request of every repeat)", out["from_turn2"])
    return out


# ------------------------------------------------------------------ every arm live, interleaved
def interleave(arms: Sequence[str], repeats: int, trace_of: Callable[[int], Sequence],
               send: Callable[[str, int, Any], dict], *, alternate: bool = False,
               pause: float = 0.0) -> dict[str, list[list[dict]]]:
    """Replay `trace_of(rep)` for rep = 0 (a warm-up, not kept) .. `repeats`, each turn sent to every arm
    (`send(arm, rep, turn) -> row`, after `pause` seconds) before the next turn; in `arms` order, or with
    `alternate` reversed on every other (replay + turn) so no arm always goes first.
    Returns per arm, per turn, the rows of the kept replays."""
    out: dict[str, list[list[dict]]] = {}
    for rep in range(repeats + 1):
        trace = trace_of(rep)
        out = out or {arm: [[] for _ in trace] for arm in arms}
        for t, turn in enumerate(trace):
            order = arms if not alternate or (rep + t) % 2 == 0 else arms[::-1]
            for arm in order:
                if pause:
                    time.sleep(pause)
                row = send(arm, rep, turn)
                if rep:
                    out[arm][t].append(row)
    return out


def interleaved_turns(rows: dict[str, list[list[dict]]]) -> list[dict]:
    """Per turn: median TTFT (ms) per arm over the kept replays, kvreuse / prefix, and the last replay's other
    fields per arm ({"prefill_tokens": {arm: n}, ...})."""
    arms = list(rows)
    out = []
    for t in range(len(rows[arms[0]])):
        ms = {arm: 1e3 * statistics.median(r["ttft_s"] for r in rows[arm][t]) for arm in arms}
        row = {"turn": t + 1, "ttft_ms": ms, "ttft_ratio": ratio(ms.get("kvreuse"), ms.get("prefix"))}
        for key in rows[arms[0]][t][-1]:
            if key != "ttft_s":
                row[key] = {arm: rows[arm][t][-1][key] for arm in arms}
        out.append(row)
    return out
