"""The screenshot-agent trace: kvreuse vs vLLM prefix caching alone, in one run.

Two servers on the same tiny random Qwen2-VL checkpoint (built offline), both up for the whole run
(`bench/serve_common.py`'s `serve`) and driven turn by turn, interleaved, so both see the same machine
state:
  * kvreuse — `kvreuse serve` (KVReuseConnector, segmented prefill; prefix caching stays on);
  * prefix  — stock vLLM, prefix caching on (its default), vision-encoder cache on (its default).
Each turn shows the last `--window` screenshots (oldest dropped, a new one added; each its own user
message with a caption) plus a question.  Per turn and arm it reports TTFT (streamed, median over
`--repeats` replays with fresh pictures each replay; replay 0 warms up), vision-encoder runs (images
the model's `embed_multimodal` encoded, counted in each server process by the worker-extension hook
of `tests/support/encoder_count.py`) and prefill tokens computed (prompt − cached).

    python bench/mm_bench.py [--layers 8 --hidden 512 --pixels 448 --turns 6 --window 4 --repeats 3 --out FILE]
    python bench/mm_bench.py --quick                 # smoke test: 3 turns, window 3, 224 px, 1 repeat
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common_cli import bench_parser, kvreuse_config, parse_bench_args, rep_seed, write_result  # noqa: E402
from bench.common_table import Col, print_table  # noqa: E402
from bench.common_turns import (TTFT_COLS, interleave, interleaved_turns, kvreuse_stats,  # noqa: E402
                                openai_client, ratio_from_turn2)
from bench.serve_common import ARMS, bench_vl_spec, build_bench_model, host_text, serve  # noqa: E402
from kvreuse.models.trace import screenshot_trace  # noqa: E402
from server.demo import ttft  # noqa: E402
from tests.support.encoder_count import encoded_items, encoder_count_args, encoder_count_env  # noqa: E402

KVREUSE_CONFIG = {"store": {"device_bytes": "2GiB"}, "policy": {"fidelity": "fast"}}
QUICK = {"turns": 3, "window": 3, "pixels": 224, "repeats": 1}
COLS = (Col("turn", 4), Col("prompt", 6), "|", *TTFT_COLS, "|", Col("encoder runs kvreuse", 20), Col("prefix", 6),
        "|", Col("prefill tok kvreuse", 19), Col("prefix", 6))


def main() -> int:
    ap = bench_parser(__doc__, repeats=3, quick="smoke test: 3 turns, window 3, 224 px, 1 repeat",
                      dtype="checkpoint and served dtype", dtype_choices=None,
                      kvreuse_config=f"JSON for the kvreuse arm (default: {KVREUSE_CONFIG})")
    ap.add_argument("--arch", default="qwen2_vl", choices=["qwen2_vl", "qwen2_5_vl"])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vision-depth", type=int, default=2)
    ap.add_argument("--vision-dim", type=int, default=128)
    ap.add_argument("--pixels", type=int, default=448, help="screenshot side; 448 -> 256 image tokens")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--pause", type=float, default=1.0,
                    help="seconds between requests, so one server's background work (kvreuse's saves) does not "
                         "land inside the other arm's measurement")
    a = parse_bench_args(ap, QUICK)
    spec = bench_vl_spec(a.arch, a.layers, a.hidden, a.pixels, a.vision_depth, a.vision_dim, a.dtype)
    model_dir, words = build_bench_model(spec)
    tmp = tempfile.mkdtemp(prefix="kvreuse-mm-bench-")
    enc_logs = {arm: os.path.join(tmp, f"{arm}.encoder") for arm in ARMS}
    extra = ["--limit-mm-per-prompt", json.dumps({"image": a.window, "video": 0}), *encoder_count_args()]

    def trace_of(rep: int) -> list:  # replay 0 warms up; fresh screenshots every replay
        return screenshot_trace(a.turns, window=a.window, seed=rep_seed(a.seed, rep, scale=100), words=words,
                                size=(a.pixels, a.pixels))

    def send(arm: str, rep: int, turn: dict) -> dict:
        e0 = encoded_items(enc_logs[arm])
        s, prompt, cached = ttft(clients[arm], model_dir, turn["messages"])
        return {"ttft_s": s, "prompt_tokens": prompt, "prefill_tokens": prompt - cached,
                "encoder_runs": encoded_items(enc_logs[arm]) - e0}

    with contextlib.ExitStack() as stack:  # both servers up for the run
        servers = {}
        for arm in ARMS:
            open(enc_logs[arm], "w").close()
            env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                   **encoder_count_env(enc_logs[arm])}
            servers[arm] = stack.enter_context(serve(arm, model_dir, log_dir=tmp, env=env, extra=extra, dtype=a.dtype,
                                                     kvreuse_config=kvreuse_config(a, KVREUSE_CONFIG)))
        clients = {arm: openai_client(srv.url) for arm, srv in servers.items()}
        rows = interleave(ARMS, a.repeats, trace_of, send, alternate=True, pause=a.pause)
        table = interleaved_turns(rows)
        print(f"model: tiny {a.arch}, {a.layers} layers, hidden {a.hidden}, vision {a.vision_depth}x{a.vision_dim}, "
              f"{a.dtype}; screenshots {a.pixels}x{a.pixels} ({(a.pixels // 28) ** 2} tokens each), window "
              f"{a.window}, {a.turns} turns; median of {a.repeats} replays; {host_text()}")
        print_table(COLS, [[r["turn"], r["prompt_tokens"]["kvreuse"], *(r["ttft_ms"][arm] for arm in ARMS),
                            r["ttft_ratio"], *(r["encoder_runs"][arm] for arm in ARMS),
                            *(r["prefill_tokens"][arm] for arm in ARMS)] for r in table])
        per_replay = {key: {arm: sum(r[key][arm] for r in table) for arm in ARMS}
                      for key in ("encoder_runs", "prefill_tokens")}
        ratio = ratio_from_turn2(table)
        print(f"median TTFT ratio kvreuse / prefix from turn 2: {'-' if ratio is None else f'{ratio:.2f}'}; encoder "
              f"runs per replay: kvreuse {per_replay['encoder_runs']['kvreuse']}, prefix "
              f"{per_replay['encoder_runs']['prefix']}; prefill tokens per replay: kvreuse "
              f"{per_replay['prefill_tokens']['kvreuse']}, prefix {per_replay['prefill_tokens']['prefix']}")
        kvreuse_stats(servers["kvreuse"].url)
        write_result(a, "mm", model=spec.tag(), turns=table,
                     summary={"median_ttft_ratio_from_turn2": ratio, "per_replay": per_replay}, runs=rows,
                     server_commands={arm: srv.command() for arm, srv in servers.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
