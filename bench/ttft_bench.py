"""TTFT on the sliding-window agent trace: kvreuse vs vLLM prefix caching alone vs no caching.

One `kvreuse serve` process serves all three arms, interleaved turn by turn, so they share the
machine's state:
  * kvreuse       — plain requests (vLLM's prefix cache + kvreuse);
  * prefix-cache  — `kv_transfer_params={"kvreuse": false}` and one cache salt per trace replay,
                    so vLLM's prefix cache works across that arm's turns but kvreuse does nothing;
  * no caching    — opted out and a fresh salt per request: nothing can be reused.
Each arm replays its own copy of the trace (different salts keep them apart).  Seeded, with a
warm-up trace; prints median TTFT per turn over `--repeats` replays, prefill tokens computed
(prompt − cached) and the ratio kvreuse / prefix-cache.

    python bench/ttft_bench.py [--layers 8 --hidden 512 --turns 6 --repeats 3 --out FILE]
    python bench/ttft_bench.py --quick               # smoke test: 3 turns, 1 repeat

The printed table is what bench/results_table.py reads from a saved `ttft*.txt` (its first line
names the model and trace); `--out` writes the same figures as JSON.
"""

from __future__ import annotations

import contextlib
import os
import sys
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common_cli import bench_parser, kvreuse_config, parse_bench_args, rep_seed, write_result  # noqa: E402
from bench.common_table import Col, print_table  # noqa: E402
from bench.common_turns import (interleave, interleaved_turns, kvreuse_stats, openai_client,  # noqa: E402
                                ratio_from_turn2)
from bench.serve_common import bench_model_spec, build_bench_model, host_text, serve  # noqa: E402
from kvreuse.models.trace import agent_trace  # noqa: E402
from server.demo import ttft  # noqa: E402

ARMS = ("kvreuse", "prefix", "none")
KVREUSE_CONFIG = {"store": {"device_bytes": "2GiB"}, "policy": {"fidelity": "fast"}}
QUICK = {"turns": 3, "repeats": 1}
COLS = (Col("turn", 4), "|", Col("TTFT ms kvreuse", 15, ".1f"), Col("prefix", 8, ".1f"), Col("none", 8, ".1f"), "|",
        Col("prefill tok kvreuse", 19), Col("prefix", 7), Col("none", 6), "|", Col("kvreuse/prefix", 14, ".2f"))


def main() -> int:
    ap = bench_parser(__doc__, repeats=3, quick="smoke test: 3 turns, 1 repeat", dtype="checkpoint and served dtype",
                      dtype_choices=None, kvreuse_config=f"JSON for kvreuse (default: {KVREUSE_CONFIG})")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--frame-words", type=int, default=160)
    ap.add_argument("--port", type=int, default=0)
    a = parse_bench_args(ap, QUICK)
    spec = bench_model_spec(a.layers, a.hidden, a.dtype)
    model_dir, _ = build_bench_model(spec)
    salts: dict[int, str] = {}  # the prefix-cache arm's salt of each replay

    def trace_of(rep: int) -> list:  # replay 0 warms up
        return agent_trace(a.turns, seed=rep_seed(a.seed, rep), frame_words=a.frame_words, system_words=64,
                           vocab_size=spec.vocab_size)

    def send(arm: str, rep: int, msgs) -> dict:
        extra = {}
        if arm != "kvreuse":  # opted out; one salt per replay (prefix cache across turns) or per request (none)
            extra = {"kv_transfer_params": {"kvreuse": False},
                     "cache_salt": salts.setdefault(rep, uuid.uuid4().hex) if arm == "prefix" else uuid.uuid4().hex}
        s, prompt, cached = ttft(client, model_dir, msgs, **extra)
        return {"ttft_s": s, "prompt_tokens": prompt, "prefill_tokens": prompt - cached}

    with contextlib.ExitStack() as stack:
        with contextlib.redirect_stdout(sys.stderr):  # stdout starts with the table's header line
            srv = stack.enter_context(serve("kvreuse", model_dir, kvreuse_config=kvreuse_config(a, KVREUSE_CONFIG),
                                            dtype=a.dtype, port=a.port or None))
        client = openai_client(srv.url)
        rows = interleave(ARMS, a.repeats, trace_of, send)
        table = interleaved_turns(rows)
        print(f"model: {a.layers} layers, hidden {a.hidden}, {a.dtype}; trace: {a.turns} turns, window 5 x "
              f"{a.frame_words} words; median of {a.repeats} replays; host: {host_text()}")
        print_table(COLS, [[r["turn"], *(r["ttft_ms"][arm] for arm in ARMS),
                            *(r["prefill_tokens"][arm] for arm in ARMS), r["ttft_ratio"]] for r in table])
        ratio = ratio_from_turn2(table)
        if ratio is not None:
            print(f"median ratio kvreuse / prefix-cache from turn 2: {ratio:.2f} (target <= 0.35)")
        kvreuse_stats(srv.url)
        summary = {"median_ttft_ratio_from_turn2": ratio, "targets": {"median_ttft_ratio_from_turn2": "<= 0.35"}}
        write_result(a, "ttft", model=spec.tag(), turns=table, summary=summary, runs=rows,
                     server_commands={"kvreuse": srv.command()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
