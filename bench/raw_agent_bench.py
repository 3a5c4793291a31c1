"""The sliding-window agent as one raw `/v1/completions` text per turn: kvreuse vs vLLM prefix caching alone.

Each turn's prompt is one string: a system text, then the last `--window` frames (tool outputs of
`--frame-words` tiny words; the oldest dropped and a new one added every turn), each introduced by
`--sep-words` separator words, then a new question.  No chat messages, no blank lines: kvreuse
finds the frames by content-defined chunking alone.  `--separators fixed` (default): the same
separator words join every pair of frames, as a str.join would; `--separators fresh`: new separator
words around every frame each turn (frames renumbered by their place in the window), the harder
case.  At most the system text and the `window - 1` carried-over frames (with their separators when
fixed) are reusable: ~80% of a later turn with the defaults (printed per turn as "reusable").

One server at a time (`bench/serve_common.py`): each repeat starts a fresh server per arm, in
alternating order, warms it up on an unrelated trace, then replays the repeat's trace turn by turn,
waiting for the server's counters to settle between turns.  Per turn it reports the median over
repeats of TTFT (streamed) per arm and their ratio, the share of prompt tokens kvreuse placed
(`kvreuse_reused_tokens_total` delta) and the share clients see as cached (`cached_tokens`, which
counts vLLM's prefix hit and kvreuse's placed tokens), kvreuse's claims by policy and segments.

    python bench/raw_agent_bench.py [--turns 6 --window 5 --frame-words 160 --repeats 3 --out FILE]
    python bench/raw_agent_bench.py --separators fresh   # new separator words every turn
    python bench/raw_agent_bench.py --quick          # smoke test: 3 turns, 1 repeat
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.serve_common import (ARMS, arm_order, bench_model_spec, delta, fmt, host_label,  # noqa: E402
                                median, print_spread, ratio, reuse_summary, serve, settle, stream_completion,
                                turn_spread, warm_seed, write_json)


def raw_agent_trace(turns: int, *, window: int, frame_words: int, sep_words: int, system_words: int,
                    question_words: int, seed: int, words: list[str], separators: str = "fixed") -> list[dict]:
    """Per turn: {"prompt": str, "reusable_words": words also in the previous turn (system + carried frames,
    with their separators when `separators` is "fixed"), "words": all words}.  Every frame is `frame_words`
    long (so the reusable share is the same every turn); "fresh" separators are new words around every
    frame every turn."""
    rng = random.Random(seed)
    text = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    system = text(system_words)
    fixed = text(sep_words)
    sep = (lambda: fixed) if separators == "fixed" else (lambda: text(sep_words))  # noqa: E731
    lens = [frame_words] * (window + turns)
    frames = [text(n) for n in lens]
    out = []
    for t in range(turns):
        parts = [system]
        for i in range(t, t + window):
            parts += [sep(), frames[i]]
        parts += [sep(), text(question_words)]
        prompt = " ".join(parts)
        per_frame_sep = sep_words if separators == "fixed" else 0
        carried = sum(n + per_frame_sep for n in lens[t:t + window - 1]) if t else 0
        out.append({"prompt": prompt, "words": len(prompt.split()),
                    "reusable_words": (system_words + carried) if t else 0})
    return out


def run_arm(server, model: str, trace: list[dict], warm: list[dict]) -> list[dict]:
    """Replay `trace` on one server (after `warm`); one row of measurements per turn."""
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=600)
    for turn in warm:
        stream_completion(client, model, turn["prompt"])
    before = settle(server.url)
    rows = []
    for turn in trace:
        s, prompt, cached = stream_completion(client, model, turn["prompt"])
        after = settle(server.url)
        d = delta(after, before)
        before = after
        rows.append({"ttft_s": s, "prompt_tokens": prompt, "cached_tokens": cached,
                     "prefix_cache_hits": int(d.get("vllm:prefix_cache_hits_total", 0)), **reuse_summary(d)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--frame-words", type=int, default=160)
    ap.add_argument("--sep-words", type=int, default=3)
    ap.add_argument("--separators", choices=["fixed", "fresh"], default="fixed",
                    help="fixed: the same words join all frames; fresh: new words around every frame each turn")
    ap.add_argument("--system-words", type=int, default=64)
    ap.add_argument("--question-words", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kvreuse-config", default=None, help="JSON for the kvreuse arm (default: serve_common's)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="vLLM's --dtype for both arms (the checkpoint is bf16)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 3 turns, 1 repeat")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args()
    if a.quick:
        a.turns, a.repeats = 3, 1
    import json

    from kvreuse.models import build_tiny_model
    from kvreuse.models.tiny import tiny_words

    spec = bench_model_spec()
    model_dir = str(build_tiny_model(None, spec))
    words = tiny_words(spec.vocab_size)
    shape = dict(window=a.window, frame_words=a.frame_words, sep_words=a.sep_words, system_words=a.system_words,
                 question_words=a.question_words, words=words, separators=a.separators)
    kvcfg = json.loads(a.kvreuse_config) if a.kvreuse_config else None
    runs = {arm: [] for arm in ARMS}  # per arm: one list of turn rows per repeat
    commands: dict[str, str] = {}
    traces = []
    t0 = time.time()
    for rep in range(a.repeats):
        trace = raw_agent_trace(a.turns, seed=1000 * (a.seed + 1) + rep, **shape)
        warm = raw_agent_trace(2, seed=warm_seed(1000 * (a.seed + 1) + rep), **shape)
        traces.append(trace)
        for arm in arm_order(rep):
            with serve(arm, model_dir, kvreuse_config=kvcfg, dtype=a.dtype) as srv:
                runs[arm].append(run_arm(srv, model_dir, trace, warm))
                commands[arm] = srv.command()
    elapsed = time.time() - t0

    def med(arm: str, t: int, key: str):
        return median(r[t][key] for r in runs[arm])

    def share(arm: str, t: int, key: str):
        return median(r[t][key] / r[t]["prompt_tokens"] for r in runs[arm])

    print(f"\nraw-text sliding-window agent, /v1/completions; model: tiny llama 8 layers, hidden 512, bf16 checkpoint "
          f"served as {a.dtype}; window {a.window} x {a.frame_words} words, {a.sep_words} {a.separators} separator "
          f"words per frame, {a.turns} turns; medians of {a.repeats} repeats (one server at a time); "
          f"{host_label()}; {elapsed:.0f} s")
    print(f"{'turn':>4} {'prompt':>6} {'reusable':>8} | {'TTFT ms kvreuse':>15} {'prefix':>8} {'ratio':>6} | "
          f"{'placed':>6} {'cached kvr':>10} {'cached pfx':>10} | {'segs p/c':>8} {'gap tok':>7} | claims by policy")
    table = []
    for t in range(a.turns):
        k, p = med("kvreuse", t, "ttft_s"), med("prefix", t, "ttft_s")
        last = runs["kvreuse"][-1][t]
        reusable = median(tr[t]["reusable_words"] / tr[t]["words"] for tr in traces)
        row = {"turn": t + 1, "prompt_tokens": med("kvreuse", t, "prompt_tokens"), "reusable_share": reusable,
               "ttft_ms": {"kvreuse": 1e3 * k, "prefix": 1e3 * p}, "ttft_ratio": ratio(k, p),
               "placed_share": share("kvreuse", t, "reused_tokens"),
               "cached_share": {arm: share(arm, t, "cached_tokens") for arm in ARMS},
               "claims_by_policy_last_repeat": last["claims_by_policy"], "segments_last_repeat": last["segments"],
               "gap_tokens": med("kvreuse", t, "gap_tokens"), "load_ms_p50": med("kvreuse", t, "load_ms_p50")}
        table.append(row)
        segs = f"{last['segments'].get('placed', 0)}/{last['segments'].get('computed', 0)}"
        claims = ", ".join(f"{k2} {v}" for k2, v in last["claims_by_policy"].items()) or "-"
        print(f"{t + 1:>4} {row['prompt_tokens']:>6.0f} {reusable:>8.0%} | {1e3 * k:>15.1f} {1e3 * p:>8.1f} "
              f"{fmt(row['ttft_ratio']):>6} | {row['placed_share']:>6.0%} {row['cached_share']['kvreuse']:>10.0%} "
              f"{row['cached_share']['prefix']:>10.0%} | {segs:>8} {row['gap_tokens']:>7.0f} | {claims}")
    later = table[1:]
    summary = {}
    if later:
        placed = median(sum(r[t]["reused_tokens"] for t in range(1, a.turns)) /
                        sum(r[t]["prompt_tokens"] for t in range(1, a.turns)) for r in runs["kvreuse"])
        claims: dict[str, int] = {}
        for r in runs["kvreuse"]:
            for t in range(1, a.turns):
                for pol, n in r[t]["claims_by_policy"].items():
                    claims[pol] = claims.get(pol, 0) + n
        summary = {"median_ttft_ratio_from_turn2": median(r["ttft_ratio"] for r in later),
                   "placed_share_from_turn2": placed,
                   "claims_by_policy_from_turn2_all_repeats": claims,
                   "targets": {"placed_share_from_turn2": ">= 0.70", "median_ttft_ratio_from_turn2": "<= 0.40"}}
        print(f"from turn 2: median TTFT ratio kvreuse / prefix {fmt(summary['median_ttft_ratio_from_turn2'])} "
              f"(target <= 0.40); placed {placed:.1%} of prompt tokens (target >= 70%); claims by policy "
              f"(all repeats): {claims}")
    summary["turn1"] = turn_spread(runs, range(0, 1))
    summary["from_turn2"] = turn_spread(runs, range(1, a.turns))
    print_spread("turn 1", summary["turn1"])
    print_spread("from turn 2 (every request of every repeat)", summary["from_turn2"])
    write_json(a.out, {"bench": "raw_agent", "args": vars(a), "model": spec.tag(), "turns": table, "summary": summary,
                       "runs": runs, "elapsed_s": elapsed, "server_commands": commands})
    return 0


if __name__ == "__main__":
    sys.exit(main())
