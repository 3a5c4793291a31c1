"""RAG traffic through vLLM's own benchmark client: kvreuse vs vLLM prefix caching alone, in one run.

A seeded corpus of `--passages` passages (150-250 random words of the model's vocabulary each); every
prompt is `--per-prompt` of them, drawn at random and in random order, joined by `--joiner` ("\\n\\n"
by default, as retrieval pipelines do; `--joiner " "` leaves kvreuse only its content-defined cuts)
and followed by a new question.  The prompts go to a custom JSONL dataset that
`vllm.benchmarks.serve` (what `vllm bench serve` runs) sends to `/v1/completions` raw (no chat
template), `--concurrency` at a time, in file order, every request generating `--output-len` tokens
(EOS ignored).

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
    python bench/rag_bench.py --model smollm2 --concurrency 1 --prompts 40   # the real model: outputs compared
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common_cli import bench_parser, kvreuse_config, parse_bench_args, rep_seed, write_result  # noqa: E402
from bench.common_client import (add_client_options, add_model_option, agreement, bench_model,  # noqa: E402
                                 client_arms, client_medians, jsonl_dataset,
                                 load_args, print_client_table)
from bench.serve_common import fmt, host_text, serve, warm_seed  # noqa: E402

QUICK = {"prompts": 12, "repeats": 1}


def rag_prompts(n: int, *, passages: int, per_prompt: int, joiner: str, question_words: int, seed: int,
                words: list[str], min_words: int = 150, max_words: int = 250) -> list[str]:
    """`n` prompts of `per_prompt` passages (of a corpus of `passages`) in random order plus a new question."""
    rng = random.Random(seed)
    text = lambda k: " ".join(rng.choice(words) for _ in range(k))  # noqa: E731
    corpus = [text(rng.randint(min_words, max_words)) for _ in range(passages)]
    return [joiner.join([corpus[i] for i in rng.sample(range(passages), per_prompt)] + [text(question_words)])
            for _ in range(n)]


def main() -> int:
    ap = bench_parser(__doc__, repeats=3, quick="smoke test: 12 prompts, 1 repeat",
                      dtype="the served dtype (--model smollm2; the tiny model is built in bf16)")
    add_model_option(ap)
    add_client_options(ap, prompts=48)
    ap.add_argument("--passages", type=int, default=12)
    ap.add_argument("--per-prompt", type=int, default=4)
    ap.add_argument("--question-words", type=int, default=16)
    ap.add_argument("--joiner", default="\n\n",
                    help='text between passages (and before the question); " " leaves CDC cuts only')
    a = parse_bench_args(ap, QUICK)
    model = bench_model(a)
    model_dir, words = model.dir, model.words
    shape = dict(passages=a.passages, per_prompt=a.per_prompt, joiner=a.joiner, question_words=a.question_words,
                 words=words)
    tmp = tempfile.mkdtemp(prefix="kvreuse-rag-bench-")

    def prepare(rep: int) -> tuple[list[str], list[str]]:  # (client options of the repeat's dataset, warm-up)
        seed = rep_seed(a.seed, rep)
        dataset = jsonl_dataset(os.path.join(tmp, f"rag-{rep}.jsonl"), rag_prompts(a.prompts, seed=seed, **shape),
                                a.output_len)
        return dataset + load_args(a, seed), rag_prompts(2, seed=warm_seed(seed), **shape)

    runs = client_arms(a.repeats, model_dir, prepare,
                       lambda arm, rep: serve(arm, model_dir, kvreuse_config=kvreuse_config(a, model.kvreuse_config),
                                              dtype=model.dtype, log_dir=tmp), model.arms)
    m, ratios = client_medians(runs.runs)
    k = m["kvreuse"]
    summary = {**ratios, "placed_share": k["placed_share"], "load_ms_p50": k["load_ms_p50"], **agreement(runs.runs),
               "targets": {"placed_share": ">= 0.65", "mean_ttft_ratio": "<= 0.50", "p99_ttft_ratio": "<= 1.0",
                           "load_ms_p50": "<= 15"}}
    print(f"\nRAG via vllm.benchmarks.serve (custom JSONL, /v1/completions): {a.per_prompt} of {a.passages} passages "
          f"per prompt, random order, joined by {json.dumps(a.joiner)}, {a.prompts} prompts, {a.concurrency} "
          f"concurrent, {a.output_len} output tokens; model: {model.text}; medians of "
          f"{a.repeats} repeats (one server at a time); {host_text()}; {runs.elapsed_s:.0f} s")
    print_client_table(m, ratios, runs.runs)
    if a.model == "tiny":  # the speed targets of placement itself (fidelity "fast")
        print(f"targets: placed >= 65% (got {fmt(k['placed_share'], '.1%')}), mean TTFT <= 0.50x "
              f"(got {fmt(ratios['mean_ttft_ratio'])}), p99 <= 1.00x (got {fmt(ratios['p99_ttft_ratio'])}), "
              f"load p50 <= 15 ms (got {fmt(k['load_ms_p50'], '.1f')})")
    write_result(a, "rag", model=model.tag, medians=m, summary=summary, **runs.fields(),
                 client_args=runs.prepared[-1][0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
