"""Nothing reusable, through vLLM's own benchmark client: what kvreuse costs when it cannot help.

`--prompts` prompts of `--input-len` tokens, every token an independent random word of the tiny
vocabulary (one word = one token), so no chunk of one prompt recurs in another (a 16-token chunk
repeating by chance has probability ~4096^-16).  They go as a custom JSONL dataset through
`vllm.benchmarks.serve` (what `vllm bench serve` runs) to `/v1/completions` raw (no chat template),
`--concurrency` at a time, every request generating `--output-len` tokens (EOS ignored).

`--dataset random` uses vLLM's own random dataset instead.  Beware: it builds each prompt as a window
of consecutive ids of one cyclic sequence over the vocabulary (`allowed_tokens[(offset + i + arange(n))
% len]`), so on a 4k vocabulary two 1,024-token prompts share a long run of tokens at another offset
about half the time; kvreuse places those runs, which is reuse, not its overhead.

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
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.serve_common import (ARMS, arm_order, bench_model_spec, client_medians, client_run,  # noqa: E402
                                fmt, host_label, paired_ratios, print_client_table, serve, warm_seed, write_json)


def random_prompts(n: int, length: int, *, seed: int, words: list[str]) -> list[str]:
    """`n` prompts of `length` independent random words (= tokens)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(length)) for _ in range(n)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=40)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--dataset", choices=["words", "random"], default="words",
                    help="words: independent random words (custom JSONL); random: vLLM's random dataset")
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--same-servers", action="store_true", help="both servers up for the whole run, driven in turn")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kvreuse-config", default=None, help="JSON for the kvreuse arm (default: serve_common's)")
    ap.add_argument("--prefix-args", default="", help="extra vLLM arguments for vLLM alone only (e.g. "
                    "'--no-async-scheduling', which kvreuse serve sets; on vLLM's CPU backend it changes nothing)")
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
    kvcfg = json.loads(a.kvreuse_config) if a.kvreuse_config else None
    tmp = tempfile.mkdtemp(prefix="kvreuse-noreuse-bench-")
    runs = {arm: [] for arm in ARMS}
    commands: dict[str, str] = {}
    t0 = time.time()

    def serve_arm(arm: str):
        return serve(arm, model_dir, kvreuse_config=kvcfg, log_dir=tmp, prefix_extra=a.prefix_args.split())

    with contextlib.ExitStack() as stack:  # --same-servers: both up for the run (stopped on any error too)
        servers = {arm: stack.enter_context(serve_arm(arm)) for arm in ARMS} if a.same_servers else {}
        for rep in range(a.repeats):
            seed = 1000 * (a.seed + 1) + rep
            common = ["--num-prompts", str(a.prompts), "--max-concurrency", str(a.concurrency), "--request-rate", "inf",
                      "--ignore-eos", "--seed", str(seed)]
            if a.dataset == "words":
                dataset = os.path.join(tmp, f"noreuse-{rep}.jsonl")
                with open(dataset, "w") as f:
                    for p in random_prompts(a.prompts, a.input_len, seed=seed, words=words):
                        f.write(json.dumps({"prompt": p, "output_tokens": a.output_len}) + "\n")
                args = ["--dataset-name", "custom", "--dataset-path", dataset, "--custom-output-len", str(a.output_len),
                        "--skip-chat-template", "--disable-shuffle", *common]
            else:
                args = ["--dataset-name", "random", "--random-input-len", str(a.input_len), "--random-output-len",
                        str(a.output_len), "--random-range-ratio", "0", *common]
            warm = random_prompts(2, a.input_len, seed=warm_seed(seed), words=words)
            for arm in arm_order(rep):
                with contextlib.nullcontext(servers[arm]) if arm in servers else serve_arm(arm) as srv:
                    runs[arm].append(client_run(srv, model_dir, args, warm))
                    commands[arm] = srv.command()
    elapsed = time.time() - t0

    m, of_medians = client_medians(runs)
    paired = paired_ratios(runs)
    ratios = {k: paired.get(k, of_medians[k]) for k in of_medians}  # the table's ratio row: paired
    ratios["output_throughput_ratio"] = paired["throughput_ratio"]  # (every request generates the same tokens)
    summary = {**ratios, "ratios_of_medians": of_medians, "paired_each": {k: v for k, v in paired.items() if
                                                                          k.endswith("_each")},
               "placed_share": m["kvreuse"]["placed_share"],
               "targets": {"mean_ttft_ratio": "<= 1.05", "throughput_ratio": ">= 0.95"}}
    how = "both servers up, driven in turn" if a.same_servers else "a fresh server per arm and repeat"
    print(f"\nnothing reusable via vllm.benchmarks.serve ({a.dataset} dataset, /v1/completions): {a.prompts} prompts "
          f"of {a.input_len} tokens, {a.concurrency} concurrent, {a.output_len} output tokens; model: tiny llama "
          f"8 layers, hidden 512, bf16; {a.repeats} repeats ({how}); {host_label()}; {elapsed:.0f} s")
    print_client_table(m, ratios, runs)
    print("ratio row: medians over repeats of each repeat's kvreuse / vLLM alone; ratios of the arms' medians: "
          + ", ".join(f"{k} {fmt(v)}" for k, v in of_medians.items()))
    for k, v in paired.items():
        if k.endswith("_each"):
            print(f"  {k[:-5]} per repeat: " + " ".join(fmt(x) for x in v))
    print(f"targets: mean TTFT <= 1.05x (got {fmt(ratios['mean_ttft_ratio'])}), throughput >= 0.95x "
          f"(got {fmt(ratios['throughput_ratio'])}); p99 ratio {fmt(ratios['p99_ttft_ratio'])}")
    write_json(a.out, {"bench": "noreuse", "args": vars(a), "model": spec.tag(), "host": host_label(), "medians": m,
                       "summary": summary, "runs": runs, "elapsed_s": elapsed, "server_commands": commands,
                       "client_args": args})
    return 0


if __name__ == "__main__":
    sys.exit(main())
