"""Prefill and decode step times with one engine in-process: vLLM alone vs kvreuse, arm by arm.

Each arm runs in a fresh process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`: scheduler, worker and
kvreuse's threads in one process, on the host's cores), in alternating order, `--repeats` times:
`--rounds` rounds of `--concurrent` random prompts of `--input-len` tokens (nothing reusable), each
round prefilled in one step and decoded `--output-len` steps.  Reported per arm: the median over
repeats of each repeat's median decode step and median prefill step (rounds after the first).
This is where a cost that slows the forward itself shows, without a server's processes around it
(kvreuse's background threads run serial, `kvreuse.threads`, so that they open no OpenMP teams of
their own beside the forward's).

    python bench/step_bench.py [--arms off,kvreuse --repeats 2 --out FILE]
    python bench/step_bench.py --arms 'off,kvreuse,{"save": false}'   # a JSON arm: kvreuse with that config
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_arm(arm: str, model: str, a: argparse.Namespace) -> dict:
    """One arm in this process: "off" (vLLM alone, prefix caching on), "kvreuse" or a kvreuse config (JSON)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import EngineArgs, LLMEngine, SamplingParams
    from vllm.config import KVTransferConfig

    from kvreuse.connector.segmented_cls import SCHEDULER_CLS

    kw = {}
    if arm != "off":
        extra = {} if arm == "kvreuse" else json.loads(arm)
        kw = dict(kv_transfer_config=KVTransferConfig(kv_connector="KVReuseConnector", kv_role="kv_both",
                                                      kv_load_failure_policy="recompute",
                                                      kv_connector_extra_config=extra),
                  scheduler_cls=SCHEDULER_CLS)
    eng = LLMEngine.from_engine_args(EngineArgs(
        model=model, enforce_eager=True, dtype="bfloat16", gpu_memory_utilization=0.4, max_model_len=4096, seed=0,
        max_num_batched_tokens=max(2048, a.concurrent * a.input_len), enable_prefix_caching=True,
        async_scheduling=False, **kw))
    rng = random.Random(a.seed)
    vocab = eng.model_config.get_vocab_size()
    sp = SamplingParams(max_tokens=a.output_len, temperature=0.0, ignore_eos=True)
    prefill, decode = [], []
    for rnd in range(a.rounds):
        for j in range(a.concurrent):
            eng.add_request(f"r{rnd}_{j}", {"prompt_token_ids": [rng.randrange(10, vocab) for _ in range(a.input_len)]},
                            sp)
        first = True
        while eng.has_unfinished_requests():
            t = time.perf_counter()
            eng.step()
            dt = time.perf_counter() - t
            if rnd:  # the first round warms up
                (prefill if first else decode).append(dt)
            first = False
    return {"arm": arm, "decode_ms": 1e3 * statistics.median(decode), "prefill_ms": 1e3 * statistics.median(prefill)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arms", default="off,kvreuse", help="comma-separated: off, kvreuse, or kvreuse configs (JSON)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--concurrent", type=int, default=2)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="model directory (default: the benches' 8-layer tiny Llama)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run this arm here, print JSON
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args()
    if a.model is None:
        from bench.serve_common import bench_model_spec
        from kvreuse.models import build_tiny_model

        a.model = str(build_tiny_model(None, bench_model_spec()))
    if a.one is not None:
        print("RESULT " + json.dumps(run_arm(a.one, a.model, a)), flush=True)
        return 0
    arms = []  # split on commas outside JSON braces
    depth, cur = 0, ""
    for ch in a.arms:
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            arms.append(cur)
            cur = ""
        else:
            cur += ch
    arms.append(cur)
    from bench.serve_common import allocator_env  # both arms with the benches' allocator (tcmalloc where installed)

    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    for r in range(a.repeats):
        for arm in (arms if r % 2 == 0 else arms[::-1]):
            argv = [sys.executable, os.path.abspath(__file__), "--one", arm, "--model", a.model, "--rounds", str(a.rounds),
                    "--concurrent", str(a.concurrent), "--input-len", str(a.input_len), "--output-len",
                    str(a.output_len), "--seed", str(a.seed)]
            out = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **allocator_env()})
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode or not line:
                sys.stderr.write(out.stderr[-3000:])
                return 1
            res = json.loads(line[-1][7:])
            runs[arm].append(res)
            print(f"repeat {r + 1} {arm}: decode step {res['decode_ms']:.2f} ms, prefill step {res['prefill_ms']:.1f} ms",
                  flush=True)
    summary = {arm: {k: statistics.median(x[k] for x in rs) for k in ("decode_ms", "prefill_ms")}
               for arm, rs in runs.items()}
    for arm, s in summary.items():
        print(f"{arm}: median decode step {s['decode_ms']:.2f} ms, prefill step {s['prefill_ms']:.1f} ms")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"bench": "step", "args": vars(a), "summary": summary, "runs": runs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
