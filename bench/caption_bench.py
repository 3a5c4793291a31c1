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

import argparse
import json
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.serve_common import (ARMS, arm_order, delta, fmt, host_label, median, print_spread,  # noqa: E402
                                ratio, reuse_summary, serve, settle, turn_spread, warm_seed, write_json)
from kvreuse.models.trace import image_data_url  # noqa: E402
from server.demo import ttft  # noqa: E402
from tests.support.encoder_count import encoded_items, encoder_count_args, encoder_count_env  # noqa: E402


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
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=600)
    for msgs in warm:
        ttft(client, model, msgs)
    before, enc0 = settle(server.url), encoded_items(enc_log)
    rows = []
    for msgs in trace:
        s, prompt, cached = ttft(client, model, msgs)
        after = settle(server.url)
        enc = encoded_items(enc_log)
        d = delta(after, before)
        rows.append({"ttft_s": s, "prompt_tokens": prompt, "cached_tokens": cached, "encoder_runs": enc - enc0,
                     "mm_items_reused": int(d.get('kvreuse_mm_items_reused_total{modality="image"}', 0)),
                     **reuse_summary(d)})
        before, enc0 = after, enc
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--pixels", type=int, default=448, help="screenshot side; 448 -> 256 image tokens")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--caption-words", type=int, default=24)
    ap.add_argument("--system-words", type=int, default=24)
    ap.add_argument("--question-words", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kvreuse-config", default=None, help="JSON for the kvreuse arm (default: serve_common's)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="vLLM's --dtype for both arms (the checkpoint is bf16)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 3 turns, window 3, 224 px, 1 repeat")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args()
    if a.quick:
        a.turns, a.window, a.pixels, a.repeats = 3, 3, 224, 1
    from kvreuse.models.tiny_vl import TinyVLSpec, build_tiny_vl_model, vl_words

    heads = a.hidden // 64
    q = 32 // 8  # mrope sections of head_dim 64: (8, 12, 12), as bench/mm_bench.py
    spec = TinyVLSpec(arch="qwen2_vl", num_layers=a.layers, hidden_size=a.hidden, num_heads=heads,
                      num_kv_heads=max(1, heads // 4), intermediate_size=4 * a.hidden, vocab_size=2048,
                      mrope_section=(2 * q, 3 * q, 3 * q), vision_depth=2, vision_dim=128, vision_heads=2,
                      dtype="bfloat16", init_std=0.02, max_pixels=a.pixels * a.pixels)
    model_dir = str(build_tiny_vl_model(None, spec))
    words = vl_words(spec.vocab_size)
    shape = dict(window=a.window, caption_words=a.caption_words, system_words=a.system_words,
                 question_words=a.question_words, words=words, size=a.pixels)
    kvcfg = json.loads(a.kvreuse_config) if a.kvreuse_config else None
    tmp = tempfile.mkdtemp(prefix="kvreuse-caption-bench-")
    extra = ["--limit-mm-per-prompt", json.dumps({"image": a.window, "video": 0}), *encoder_count_args()]
    runs = {arm: [] for arm in ARMS}
    commands: dict[str, str] = {}
    t0 = time.time()
    for rep in range(a.repeats):
        trace = caption_trace(a.turns, seed=100 * (a.seed + 1) + rep, **shape)
        warm = caption_trace(1, seed=warm_seed(100 * (a.seed + 1) + rep), **shape)
        for arm in arm_order(rep):
            enc_log = os.path.join(tmp, f"{arm}-{rep}.encoder")
            open(enc_log, "w").close()
            with serve(arm, model_dir, kvreuse_config=kvcfg, dtype=a.dtype, log_dir=tmp, extra=extra,
                       env=encoder_count_env(enc_log)) as srv:
                runs[arm].append(run_arm(srv, model_dir, enc_log, trace, warm))
                commands[arm] = srv.command()
    elapsed = time.time() - t0

    def med(arm: str, t: int, key: str):
        return median(r[t][key] for r in runs[arm])

    print(f"\ncaptioned screenshot agent (one user message: image, caption, ...), tiny qwen2_vl {a.layers} layers, "
          f"hidden {a.hidden}, bf16 checkpoint served as {a.dtype}; {a.pixels}x{a.pixels} px "
          f"({(a.pixels // 28) ** 2} tokens each), captions {a.caption_words} words, window {a.window}, "
          f"{a.turns} turns; medians of {a.repeats} repeats (one server at a time); {host_label()}; "
          f"{elapsed:.0f} s")
    print(f"{'turn':>4} {'prompt':>6} | {'TTFT ms kvreuse':>15} {'prefix':>8} {'ratio':>6} | {'placed':>6} | "
          f"{'encoder runs kvreuse':>20} {'prefix':>6} | {'segs p/c':>8} | claims by policy")
    table = []
    for t in range(a.turns):
        k, p = med("kvreuse", t, "ttft_s"), med("prefix", t, "ttft_s")
        last = runs["kvreuse"][-1][t]
        placed = median(r[t]["reused_tokens"] / r[t]["prompt_tokens"] for r in runs["kvreuse"])
        row = {"turn": t + 1, "prompt_tokens": med("kvreuse", t, "prompt_tokens"),
               "ttft_ms": {"kvreuse": 1e3 * k, "prefix": 1e3 * p}, "ttft_ratio": ratio(k, p), "placed_share": placed,
               "encoder_runs": {arm: med(arm, t, "encoder_runs") for arm in ARMS},
               "claims_by_policy_last_repeat": last["claims_by_policy"], "segments_last_repeat": last["segments"]}
        table.append(row)
        segs = f"{last['segments'].get('placed', 0)}/{last['segments'].get('computed', 0)}"
        claims = ", ".join(f"{k2} {v}" for k2, v in last["claims_by_policy"].items()) or "-"
        print(f"{t + 1:>4} {row['prompt_tokens']:>6.0f} | {1e3 * k:>15.1f} {1e3 * p:>8.1f} "
              f"{fmt(row['ttft_ratio']):>6} | "
              f"{placed:>6.0%} | {row['encoder_runs']['kvreuse']:>20.0f} {row['encoder_runs']['prefix']:>6.0f} | "
              f"{segs:>8} | {claims}")
    summary = {}
    if a.turns > 1:
        placed = median(sum(r[t]["reused_tokens"] for t in range(1, a.turns)) /
                        sum(r[t]["prompt_tokens"] for t in range(1, a.turns)) for r in runs["kvreuse"])
        enc = max(row["encoder_runs"]["kvreuse"] for row in table[1:])
        summary = {"placed_share_from_turn2": placed, "max_kvreuse_encoder_runs_from_turn2": enc,
                   "median_ttft_ratio_from_turn2": median(row["ttft_ratio"] for row in table[1:]),
                   "targets": {"placed_share_from_turn2": ">= 0.60", "max_kvreuse_encoder_runs_from_turn2": "== 1"}}
        print(f"from turn 2: placed {placed:.1%} of prompt tokens (target >= 60%); kvreuse encoder runs per turn "
              f"at most {enc:.0f} (target 1: only the new picture); median TTFT ratio "
              f"{fmt(summary['median_ttft_ratio_from_turn2'])}")
    summary["turn1"] = turn_spread(runs, range(0, 1))
    summary["from_turn2"] = turn_spread(runs, range(1, a.turns))
    print_spread("turn 1", summary["turn1"])
    print_spread("from turn 2 (every request of every repeat)", summary["from_turn2"])
    write_json(a.out, {"bench": "caption", "args": vars(a), "model": spec.tag(), "turns": table, "summary": summary,
                       "runs": runs, "elapsed_s": elapsed, "server_commands": commands})
    return 0


if __name__ == "__main__":
    sys.exit(main())
