"""Nothing reusable, through vLLM's own benchmark client: what kvreuse costs when it cannot help.

`--prompts` prompts of `--input-len` tokens, every token an independent random word of the tiny
vocabulary (one word = one token), so no chunk of one prompt recurs in another (a 16-token chunk
repeating by chance has probability ~4096^-16).  They go as a custom JSONL dataset through
`vllm.benchmarks.serve` (what `vllm bench serve` runs) to `/v1/completions` raw (no chat template),
`--concurrency` at a time, every request generating `--output-len` tokens (EOS ignored).

`--dataset random` uses vLLM's own random dataset instead.  Beware: it builds each prompt as a window
of consecutive ids of one cyclic sequence over the vocabulary (`allowed_tokens[(offset + i + arange(n))
% len]`), so on a 4k vocabulary two 1,024-token prompts share a long run of tokens at another offset
about half the time; kvreuse places those runs, which is reuse, not its overhead.  `--dataset
prefix_repetition` is vLLM's own shared-prefix dataset: vLLM's prefix cache serves the reuse there
exactly, so kvreuse at fidelity "exact" may add only the prefix's last, partial block.

Each repeat starts a fresh server per arm, one at a time, in alternating order, warms it up with two
unrelated random prompts and runs the client on the repeat's prompts (the same for both arms).  The
headline ratios are *paired*: the median over repeats of kvreuse / vLLM alone within each repeat (the
per-arm medians and their ratios are printed too).  `--same-servers` starts both servers once and
drives them in turn; beware: on this host a server *instance* can be 15-30% faster or slower than the
next one for its whole life (vLLM alone measured 201 to 281 ms mean TTFT in such runs, minutes
apart), so a run with the same two instances carries one such draw in every repeat, where fresh
servers draw anew each repeat.  Reported: mean / median / p99 TTFT per arm and ratio, throughput
ratio, and the share of prompt tokens kvreuse placed (0 expected).

    python bench/noreuse_bench.py [--prompts 40 --input-len 1024 --concurrency 2 --repeats 6 --out FILE]
    python bench/noreuse_bench.py --quick            # smoke test: 12 prompts, 1 repeat
    python bench/noreuse_bench.py --model smollm2 --concurrency 1 --dataset random   # the real model
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common_cli import bench_parser, kvreuse_config, parse_bench_args, rep_seed, write_result  # noqa: E402
from bench.common_client import (add_client_options, add_model_option, agreement, bench_model,  # noqa: E402
                                 client_arms, client_medians, jsonl_dataset,
                                 load_args, paired_ratios, print_client_table)
from bench.serve_common import fmt, host_text, serve, warm_seed  # noqa: E402

QUICK = {"prompts": 12, "repeats": 1}


def random_prompts(n: int, length: int, *, seed: int, words: list[str]) -> list[str]:
    """`n` prompts of `length` independent random words (= tokens)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(length)) for _ in range(n)]


def main() -> int:
    ap = bench_parser(__doc__, repeats=6, quick="smoke test: 12 prompts, 1 repeat",
                      dtype="the served dtype (--model smollm2; the tiny model is built in bf16)")
    add_model_option(ap)
    add_client_options(ap, prompts=40)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--dataset", choices=["words", "random", "prefix_repetition"], default="words",
                    help="words: independent random words (custom JSONL); random: vLLM's random dataset; "
                         "prefix_repetition: vLLM's shared-prefix dataset (4 prefixes of 3/4 of --input-len)")
    ap.add_argument("--same-servers", action="store_true", help="both servers up for the whole run, driven in turn")
    ap.add_argument("--prefix-args", default="", help="extra vLLM arguments for vLLM alone only (e.g. "
                    "'--no-async-scheduling', which kvreuse serve sets; on vLLM's CPU backend it changes nothing)")
    a = parse_bench_args(ap, QUICK)
    model = bench_model(a)
    model_dir, words = model.dir, model.words
    tmp = tempfile.mkdtemp(prefix="kvreuse-noreuse-bench-")

    def prepare(rep: int) -> tuple[list[str], list[str]]:  # (client options of the repeat's dataset, warm-up)
        seed = rep_seed(a.seed, rep)
        if a.dataset == "words":
            dataset = jsonl_dataset(os.path.join(tmp, f"noreuse-{rep}.jsonl"),
                                    random_prompts(a.prompts, a.input_len, seed=seed, words=words), a.output_len)
        elif a.dataset == "prefix_repetition":
            prefix = 3 * a.input_len // 4
            dataset = ["--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", str(prefix),
                       "--prefix-repetition-suffix-len", str(a.input_len - prefix),
                       "--prefix-repetition-num-prefixes", "4", "--prefix-repetition-output-len", str(a.output_len)]
        else:
            dataset = ["--dataset-name", "random", "--random-input-len", str(a.input_len), "--random-output-len",
                       str(a.output_len), "--random-range-ratio", "0"]
        return dataset + load_args(a, seed), random_prompts(2, a.input_len, seed=warm_seed(seed), words=words)

    def fresh(arm: str, rep: int = 0):
        return serve(arm, model_dir, kvreuse_config=kvreuse_config(a, model.kvreuse_config), dtype=model.dtype,
                     log_dir=tmp, prefix_extra=a.prefix_args.split())

    with contextlib.ExitStack() as stack:  # --same-servers: both up for the run (stopped on any error too)
        servers = {arm: stack.enter_context(fresh(arm)) for arm in model.arms} if a.same_servers else {}
        runs = client_arms(a.repeats, model_dir, prepare,
                           lambda arm, rep: contextlib.nullcontext(servers[arm]) if servers else fresh(arm),
                           model.arms)
    m, of_medians = client_medians(runs.runs)
    paired = paired_ratios(runs.runs)
    ratios = {k: paired.get(k, of_medians[k]) for k in of_medians}  # the table's ratio row: paired
    ratios["output_throughput_ratio"] = paired["throughput_ratio"]  # (every request generates the same tokens)
    summary = {**ratios, "ratios_of_medians": of_medians,
               "paired_each": {k: v for k, v in paired.items() if k.endswith("_each")},
               "placed_share": m["kvreuse"]["placed_share"], **agreement(runs.runs),
               "targets": {"mean_ttft_ratio": "<= 1.05", "throughput_ratio": ">= 0.95"}}
    how = "both servers up, driven in turn" if a.same_servers else "a fresh server per arm and repeat"
    print(f"\nnothing reusable via vllm.benchmarks.serve ({a.dataset} dataset, /v1/completions): {a.prompts} prompts "
          f"of {a.input_len} tokens, {a.concurrency} concurrent, {a.output_len} output tokens; model: {model.text}; "
          f"{a.repeats} repeats ({how}); {host_text()}; {runs.elapsed_s:.0f} s")
    print_client_table(m, ratios, runs.runs)
    print("ratio row: medians over repeats of each repeat's kvreuse / vLLM alone; ratios of the arms' medians: "
          + ", ".join(f"{k} {fmt(v)}" for k, v in of_medians.items()))
    for k, v in summary["paired_each"].items():
        print(f"  {k[:-5]} per repeat: " + " ".join(fmt(x) for x in v))
    print(f"targets: mean TTFT <= 1.05x (got {fmt(ratios['mean_ttft_ratio'])}), throughput >= 0.95x "
          f"(got {fmt(ratios['throughput_ratio'])}); p99 ratio {fmt(ratios['p99_ttft_ratio'])}")
    write_result(a, "noreuse", model=model.tag, medians=m, summary=summary, **runs.fields(),
                 client_args=runs.prepared[-1][0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
