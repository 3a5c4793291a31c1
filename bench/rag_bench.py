"""RAG traffic through vLLM's own benchmark client: kvreuse vs vLLM prefix caching alone, in one run.

A seeded corpus of `--passages` passages (150-250 tiny words each); every prompt is `--per-prompt`
of them, drawn at random and in random order, joined by `--joiner` ("\\n\\n" by default, as retrieval
pipelines do; `--joiner " "` leaves kvreuse only its content-defined cuts) and followed by a new
question.  The prompts go to a custom JSONL dataset that `vllm.benchmarks.serve` (what `vllm bench
serve` runs) sends to `/v1/completions` raw (no chat template), `--concurrency` at a time, in file
order, every request generating `--output-len` tokens (EOS ignored).

One server at a time (`bench/serve_common.py`): each repeat starts a fresh server per arm, in
alternating order, warms it up with two prompts from an unrelated corpus, reads its /metrics, runs the
benchmark client on the repeat's dataset (the same for both arms) and reads /metrics again.  Reported
(medians over repeats): mean / median / p99 TTFT per arm and ratio, request and output throughput
ratio, the share of prompt tokens kvreuse placed over the whole run (cold passages included),
vLLM's prefix-cache hits, kvreuse's claims by policy, segments, gap tokens, and load seconds per
step (p50 from the `kvreuse_load_seconds` histogram, interpolated in its bucket, and the mean).

    python bench/rag_bench.py [--prompts 48 --concurrency 2 --repeats 3 --joiner $'\\n\\n' --out FILE]
    python bench/rag_bench.py --joiner " "           # passages joined by a space: CDC cuts only
    python bench/rag_bench.py --quick                # smoke test: 12 prompts, 1 repeat
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

from bench.serve_common import (ARMS, arm_order, bench_model_spec, client_medians, client_run,  # noqa: E402
                                fmt, host_label, print_client_table, serve, warm_seed, write_json)


def rag_prompts(n: int, *, passages: int, per_prompt: int, joiner: str, question_words: int, seed: int,
                words: list[str], min_words: int = 150, max_words: int = 250) -> list[str]:
    """`n` prompts of `per_prompt` passages (of a corpus of `passages`) in random order plus a new question."""
    rng = random.Random(seed)
    text = lambda k: " ".join(rng.choice(words) for _ in range(k))  # noqa: E731
    corpus = [text(rng.randint(min_words, max_words)) for _ in range(passages)]
    return [joiner.join([corpus[i] for i in rng.sample(range(passages), per_prompt)] + [text(question_words)])
            for _ in range(n)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--passages", type=int, default=12)
    ap.add_argument("--per-prompt", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--question-words", type=int, default=16)
    ap.add_argument("--joiner", default="\n\n",
                    help='text between passages (and before the question); " " leaves CDC cuts only')
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kvreuse-config", default=None, help="JSON for the kvreuse arm (default: serve_common's)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 12 prompts, 1 repeat")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args()
    if a.quick:
        a.prompts, a.repeats = 12, 1
    from kvreuse.models import build_tiny_model
    from kvreuse.models.tiny import tiny_words

    spec = bench_model_spec()
    model_dir = str(build_tiny_model(None, spec))
    words = tiny_words(spec.vocab_size)
    shape = dict(passages=a.passages, per_prompt=a.per_prompt, joiner=a.joiner, question_words=a.question_words,
                 words=words)
    kvcfg = json.loads(a.kvreuse_config) if a.kvreuse_config else None
    tmp = tempfile.mkdtemp(prefix="kvreuse-rag-bench-")
    runs = {arm: [] for arm in ARMS}
    commands: dict[str, str] = {}
    t0 = time.time()
    for rep in range(a.repeats):
        seed = 1000 * (a.seed + 1) + rep
        dataset = os.path.join(tmp, f"rag-{rep}.jsonl")
        with open(dataset, "w") as f:
            for p in rag_prompts(a.prompts, seed=seed, **shape):
                f.write(json.dumps({"prompt": p, "output_tokens": a.output_len}) + "\n")
        warm = rag_prompts(2, seed=warm_seed(seed), **shape)
        args = ["--dataset-name", "custom", "--dataset-path", dataset, "--num-prompts", str(a.prompts),
                "--custom-output-len", str(a.output_len), "--skip-chat-template", "--disable-shuffle",
                "--ignore-eos", "--max-concurrency", str(a.concurrency), "--request-rate", "inf", "--seed", str(seed)]
        for arm in arm_order(rep):
            with serve(arm, model_dir, kvreuse_config=kvcfg, log_dir=tmp) as srv:
                runs[arm].append(client_run(srv, model_dir, args, warm))
                commands[arm] = srv.command()
    elapsed = time.time() - t0

    m, ratios = client_medians(runs)
    k = m["kvreuse"]
    summary = {**ratios, "placed_share": k["placed_share"], "load_ms_p50": k["load_ms_p50"],
               "targets": {"placed_share": ">= 0.65", "mean_ttft_ratio": "<= 0.50", "p99_ttft_ratio": "<= 1.0",
                           "load_ms_p50": "<= 15"}}
    print(f"\nRAG via vllm.benchmarks.serve (custom JSONL, /v1/completions): {a.per_prompt} of {a.passages} passages "
          f"per prompt, random order, joined by {json.dumps(a.joiner)}, {a.prompts} prompts, {a.concurrency} "
          f"concurrent, {a.output_len} output tokens; model: tiny llama 8 layers, hidden 512, bf16; medians of "
          f"{a.repeats} repeats (one server at a time); {host_label()}; {elapsed:.0f} s")
    print_client_table(m, ratios, runs)
    print(f"targets: placed >= 65% (got {fmt(k['placed_share'], '.1%')}), mean TTFT <= 0.50x "
          f"(got {fmt(ratios['mean_ttft_ratio'])}), p99 <= 1.00x (got {fmt(ratios['p99_ttft_ratio'])}), "
          f"load p50 <= 15 ms (got {fmt(k['load_ms_p50'], '.1f')})")
    write_json(a.out, {"bench": "rag", "args": vars(a), "model": spec.tag(), "medians": m, "summary": summary,
                       "runs": runs, "elapsed_s": elapsed, "server_commands": commands, "client_args": args})
    return 0


if __name__ == "__main__":
    sys.exit(main())
