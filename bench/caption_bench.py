"""The captioned screenshot agent on a tiny Qwen2-VL: kvreuse vs vLLM prefix caching alone, in one run.

Each turn is a system message and ONE user message holding the last `--window` screenshots, each
followed by its caption text (the oldest dropped and a new one added every turn), then a question.
Screenshot `i` is the same picture (`kvreuse.models.trace.image_data_url`) and its caption the same
words every time it is re-sent, but its place in the message moves each turn, so only position-free
reuse can serve it; vLLM's prefix cache can only serve the system message (less than one 128-token
block here).

One server at a time (`bench/serve_common.py`): each repeat starts a fresh server per arm, in
alternating order, warms it up on unrelated pictures, then replays the repeat's trace turn by turn
(chat completions, streamed), waiting for the server's counters to settle between turns.  Per turn it
reports the median over repeats of TTFT per arm and ratio, the share of prompt tokens kvreuse placed
(`kvreuse_reused_tokens_total` delta), vision-encoder runs per arm (images the model's
`embed_multimodal` encoded, counted inside each server by the worker-extension hook of
`tests/support/encoder_count.py`; from turn 2 kvreuse should run it once, for the new picture), and
kvreuse's claims by policy and segments.

    python bench/caption_bench.py [--turns 6 --window 4 --pixels 448 --caption-words 24 --repeats 3 --out FILE]
    python bench/caption_bench.py --quick            # smoke test: 3 turns, window 3, 224 px, 1 repeat
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common_cli import bench_parser, kvreuse_config, parse_bench_args, rep_seed, write_result  # noqa: E402
from bench.common_table import Col, print_table  # noqa: E402
from bench.common_turns import (TTFT_COLS, agent_turn, claims_cell, from_turn2, openai_client, replay,  # noqa: E402
                                segments_cell, spreads, ttft_cells, turn_median)
from bench.serve_common import (ARMS, alternate_arms, bench_vl_spec, build_bench_model, fmt, host_text,  # noqa: E402
                                serve, settle, warm_seed)
from kvreuse.models.trace import image_data_url  # noqa: E402
from server.demo import ttft  # noqa: E402
from tests.support.encoder_count import encoded_items, encoder_count_args, encoder_count_env  # noqa: E402

QUICK = {"turns": 3, "window": 3, "pixels": 224, "repeats": 1}
MM_REUSED = 'kvreuse_mm_items_reused_total{modality="image"}'
COLS = (Col("turn", 4), Col("prompt", 6, ".0f"), "|", *TTFT_COLS, "|", Col("placed", 6, ".0%"), "|",
        Col("encoder runs kvreuse", 20, ".0f"), Col("prefix", 6, ".0f"), "|", Col("segs p/c", 8), "|",
        Col("claims by policy"))


def caption_trace(turns: int, *, window: int, caption_words: int, system_words: int, question_words: int,
                  seed: int, words: list[str], size: int) -> list[list[dict]]:
    """Chat messages of each turn: system, one user message [image, caption, image, caption, ..., question]."""
    rng = random.Random(seed)
    text = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    system = {"role": "system", "content": text(system_words)}
    captions = [text(caption_words) for _ in range(window + turns)]
    out = []
    for t in range(turns):
        content = []
        for i in range(t, t + window):
            content += [{"type": "image_url", "image_url": {"url": image_data_url(seed * 1000 + i, (size, size))}},
                        {"type": "text", "text": captions[i]}]
        content.append({"type": "text", "text": text(question_words)})
        out.append([system, {"role": "user", "content": content}])
    return out


def run_arm(server, model: str, enc_log: str, trace: list[list[dict]], warm: list[list[dict]]) -> list[dict]:
    """Replay `trace` on one server (after `warm`); one row of measurements per turn."""
    client = openai_client(server.url)
    return replay(server, lambda msgs: ttft(client, model, msgs), trace, warm,
                  lambda d: {"encoder_runs": int(d["encoded"]), "mm_items_reused": int(d.get(MM_REUSED, 0))},
                  snapshot=lambda: {**settle(server.url), "encoded": encoded_items(enc_log)})


def main() -> int:
    ap = bench_parser(__doc__, repeats=3, quick="smoke test: 3 turns, window 3, 224 px, 1 repeat",
                      dtype="vLLM's --dtype for both arms (the checkpoint is bf16)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--pixels", type=int, default=448, help="screenshot side; 448 -> 256 image tokens")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--caption-words", type=int, default=24)
    ap.add_argument("--system-words", type=int, default=24)
    ap.add_argument("--question-words", type=int, default=8)
    a = parse_bench_args(ap, QUICK)
    spec = bench_vl_spec(num_layers=a.layers, hidden_size=a.hidden, pixels=a.pixels)
    model_dir, words = build_bench_model(spec)
    shape = dict(window=a.window, caption_words=a.caption_words, system_words=a.system_words,
                 question_words=a.question_words, words=words, size=a.pixels)
    tmp = tempfile.mkdtemp(prefix="kvreuse-caption-bench-")
    extra = ["--limit-mm-per-prompt", json.dumps({"image": a.window, "video": 0}), *encoder_count_args()]

    def enc_log(arm: str, rep: int) -> str:  # the encoder-run log of one server
        return os.path.join(tmp, f"{arm}-{rep}.encoder")

    def prepare(rep: int) -> tuple[list, list]:  # (the repeat's trace, its warm-up on unrelated pictures)
        seed = rep_seed(a.seed, rep, scale=100)
        return caption_trace(a.turns, seed=seed, **shape), caption_trace(1, seed=warm_seed(seed), **shape)

    def serve_arm(arm: str, rep: int):
        open(enc_log(arm, rep), "w").close()
        return serve(arm, model_dir, kvreuse_config=kvreuse_config(a), dtype=a.dtype, log_dir=tmp, extra=extra,
                     env=encoder_count_env(enc_log(arm, rep)))

    runs = alternate_arms(a.repeats, prepare, serve_arm,
                          lambda srv, rep, tw: run_arm(srv, model_dir, enc_log(srv.arm, rep), *tw))
    table = [{**agent_turn(runs.runs, t),
              "encoder_runs": {arm: turn_median(runs.runs[arm], t, "encoder_runs") for arm in ARMS}}
             for t in range(a.turns)]
    print(f"\ncaptioned screenshot agent (one user message: image, caption, ...), tiny qwen2_vl {a.layers} layers, "
          f"hidden {a.hidden}, bf16 checkpoint served as {a.dtype}; {a.pixels}x{a.pixels} px "
          f"({(a.pixels // 28) ** 2} tokens each), captions {a.caption_words} words, window {a.window}, "
          f"{a.turns} turns; medians of {a.repeats} repeats (one server at a time); {host_text()}; "
          f"{runs.elapsed_s:.0f} s")
    print_table(COLS, [[r["turn"], r["prompt_tokens"], *ttft_cells(r), r["placed_share"], r["encoder_runs"]["kvreuse"],
                        r["encoder_runs"]["prefix"], segments_cell(r), claims_cell(r)] for r in table])
    summary = from_turn2(runs.runs, table)
    if summary:
        enc = max(row["encoder_runs"]["kvreuse"] for row in table[1:])
        summary.update(max_kvreuse_encoder_runs_from_turn2=enc,
                       targets={"placed_share_from_turn2": ">= 0.60", "max_kvreuse_encoder_runs_from_turn2": "== 1"})
        print(f"from turn 2: placed {summary['placed_share_from_turn2']:.1%} of prompt tokens (target >= 60%); "
              f"kvreuse encoder runs per turn at most {enc:.0f} (target 1: only the new picture); median TTFT ratio "
              f"{fmt(summary['median_ttft_ratio_from_turn2'])}")
    summary.update(spreads(runs.runs, a.turns))
    write_result(a, "caption", model=spec.tag(), turns=table, summary=summary, **runs.fields())
    return 0


if __name__ == "__main__":
    sys.exit(main())
