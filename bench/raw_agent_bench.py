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

import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common_cli import bench_parser, kvreuse_config, parse_bench_args, rep_seed, write_result  # noqa: E402
from bench.common_table import Col, print_table  # noqa: E402
from bench.common_turns import (TTFT_COLS, agent_turn, claims_cell, from_turn2, openai_client, replay,  # noqa: E402
                                segments_cell, spreads, stream_completion, ttft_cells, turn_median, turn_share)
from bench.serve_common import (ARMS, alternate_arms, bench_model_spec, build_bench_model, fmt, host_text,  # noqa: E402
                                median, serve, warm_seed)

QUICK = {"turns": 3, "repeats": 1}
COLS = (Col("turn", 4), Col("prompt", 6, ".0f"), Col("reusable", 8, ".0%"), "|", *TTFT_COLS, "|",
        Col("placed", 6, ".0%"), Col("cached kvr", 10, ".0%"), Col("cached pfx", 10, ".0%"), "|",
        Col("segs p/c", 8), Col("gap tok", 7, ".0f"), "|", Col("claims by policy"))


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
    client = openai_client(server.url)
    return replay(server, lambda turn: stream_completion(client, model, turn["prompt"]), trace, warm,
                  lambda d: {"prefix_cache_hits": int(d.get("vllm:prefix_cache_hits_total", 0))})


def main() -> int:
    ap = bench_parser(__doc__, repeats=3, quick="smoke test: 3 turns, 1 repeat",
                      dtype="vLLM's --dtype for both arms (the checkpoint is bf16)")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--frame-words", type=int, default=160)
    ap.add_argument("--sep-words", type=int, default=3)
    ap.add_argument("--separators", choices=["fixed", "fresh"], default="fixed",
                    help="fixed: the same words join all frames; fresh: new words around every frame each turn")
    ap.add_argument("--system-words", type=int, default=64)
    ap.add_argument("--question-words", type=int, default=16)
    a = parse_bench_args(ap, QUICK)
    spec = bench_model_spec()
    model_dir, words = build_bench_model(spec)
    shape = dict(window=a.window, frame_words=a.frame_words, sep_words=a.sep_words, system_words=a.system_words,
                 question_words=a.question_words, words=words, separators=a.separators)

    def prepare(rep: int) -> tuple[list[dict], list[dict]]:  # (the repeat's trace, its warm-up)
        seed = rep_seed(a.seed, rep)
        return raw_agent_trace(a.turns, seed=seed, **shape), raw_agent_trace(2, seed=warm_seed(seed), **shape)

    runs = alternate_arms(a.repeats, prepare,
                          lambda arm, rep: serve(arm, model_dir, kvreuse_config=kvreuse_config(a), dtype=a.dtype),
                          lambda srv, rep, tw: run_arm(srv, model_dir, *tw))
    traces = [trace for trace, _ in runs.prepared]
    table = []
    for t in range(a.turns):
        table.append({**agent_turn(runs.runs, t),
                      "reusable_share": median(tr[t]["reusable_words"] / tr[t]["words"] for tr in traces),
                      "cached_share": {arm: turn_share(runs.runs[arm], t, "cached_tokens") for arm in ARMS},
                      "gap_tokens": turn_median(runs.runs["kvreuse"], t, "gap_tokens"),
                      "load_ms_p50": turn_median(runs.runs["kvreuse"], t, "load_ms_p50")})
    print(f"\nraw-text sliding-window agent, /v1/completions; model: tiny llama 8 layers, hidden 512, bf16 checkpoint "
          f"served as {a.dtype}; window {a.window} x {a.frame_words} words, {a.sep_words} {a.separators} separator "
          f"words per frame, {a.turns} turns; medians of {a.repeats} repeats (one server at a time); "
          f"{host_text()}; {runs.elapsed_s:.0f} s")
    print_table(COLS, [[r["turn"], r["prompt_tokens"], r["reusable_share"], *ttft_cells(r), r["placed_share"],
                        r["cached_share"]["kvreuse"], r["cached_share"]["prefix"], segments_cell(r), r["gap_tokens"],
                        claims_cell(r)] for r in table])
    summary = from_turn2(runs.runs, table)
    if summary:
        claims: dict[str, int] = {}
        for r in runs.runs["kvreuse"]:
            for t in range(1, a.turns):
                for pol, n in r[t]["claims_by_policy"].items():
                    claims[pol] = claims.get(pol, 0) + n
        summary.update(claims_by_policy_from_turn2_all_repeats=claims,
                       targets={"placed_share_from_turn2": ">= 0.70", "median_ttft_ratio_from_turn2": "<= 0.40"})
        print(f"from turn 2: median TTFT ratio kvreuse / prefix {fmt(summary['median_ttft_ratio_from_turn2'])} "
              f"(target <= 0.40); placed {summary['placed_share_from_turn2']:.1%} of prompt tokens (target >= 70%); "
              f"claims by policy (all repeats): {claims}")
    summary.update(spreads(runs.runs, a.turns))
    write_result(a, "raw_agent", model=spec.tag(), turns=table, summary=summary, **runs.fields())
    return 0


if __name__ == "__main__":
    sys.exit(main())
