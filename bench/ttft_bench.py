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

    python bench/ttft_bench.py [--layers 8 --hidden 512 --turns 6 --repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kvreuse.models import TinySpec, build_tiny_model  # noqa: E402
from kvreuse.models.trace import agent_trace  # noqa: E402
from server.demo import free_port, stop, ttft, wait_healthy  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--frame-words", type=int, default=160)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--port", type=int, default=0)
    a = ap.parse_args()
    from openai import OpenAI

    heads = a.hidden // 64
    spec = TinySpec(num_layers=a.layers, hidden_size=a.hidden, num_heads=heads, num_kv_heads=max(1, heads // 4),
                    head_dim=64, intermediate_size=4 * a.hidden, vocab_size=4096, dtype=a.dtype, init_std=0.02)
    model_dir = build_tiny_model(None, spec)
    port = a.port or free_port()
    log = tempfile.NamedTemporaryFile("w", prefix="kvreuse-bench-", suffix=".log", delete=False)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    argv = [sys.executable, "-m", "kvreuse.cli", "serve", str(model_dir), "--port", str(port), "--host", "127.0.0.1",
            "--enforce-eager", "--gpu-memory-utilization", "0.4", "--max-model-len", "4096", "--dtype", a.dtype,
            "--kvreuse-config", '{"store": {"device_bytes": "2GiB"}, "policy": {"fidelity": "fast"}}']
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log.name)
        client = OpenAI(base_url=url + "/v1", api_key="unused")
        model = client.models.list().data[0].id
        arms = ("kvreuse", "prefix", "none")
        rows = {arm: [[] for _ in range(a.turns)] for arm in arms}
        prefill = {arm: [0] * a.turns for arm in arms}
        for rep in range(a.repeats + 1):  # replay 0 warms up
            trace = agent_trace(a.turns, seed=1000 + rep, frame_words=a.frame_words, system_words=64,
                                vocab_size=spec.vocab_size)
            salts = {"kvreuse": None, "prefix": uuid.uuid4().hex}
            for t, msgs in enumerate(trace):
                for arm in arms:
                    extra = {}
                    if arm != "kvreuse":
                        extra = {"kv_transfer_params": {"kvreuse": False},
                                 "cache_salt": salts["prefix"] if arm == "prefix" else uuid.uuid4().hex}
                    s, prompt, cached = ttft(client, model, msgs, **extra)
                    if rep:
                        rows[arm][t].append(s)
                        prefill[arm][t] = prompt - cached
        print(f"model: {a.layers} layers, hidden {a.hidden}, {a.dtype}; trace: {a.turns} turns, window 5 x "
              f"{a.frame_words} words; median of {a.repeats} replays; device: CPU ({os.cpu_count()} cores)")
        print(f"{'turn':>4} | {'TTFT ms kvreuse':>15} {'prefix':>8} {'none':>8} | {'prefill tok kvreuse':>19} "
              f"{'prefix':>7} {'none':>6} | {'kvreuse/prefix':>14}")
        ratios = []
        for t in range(a.turns):
            m = {arm: 1e3 * statistics.median(rows[arm][t]) for arm in arms}
            r = m["kvreuse"] / m["prefix"]
            if t:
                ratios.append(r)
            print(f"{t + 1:>4} | {m['kvreuse']:>15.1f} {m['prefix']:>8.1f} {m['none']:>8.1f} | "
                  f"{prefill['kvreuse'][t]:>19} {prefill['prefix'][t]:>7} {prefill['none'][t]:>6} | {r:>14.2f}")
        print(f"median ratio kvreuse / prefix-cache from turn 2: {statistics.median(ratios):.2f} (target <= 0.35)")
        subprocess.run([sys.executable, "-m", "kvreuse.cli", "stats", url], check=False)
        return 0
    finally:
        stop(proc)


if __name__ == "__main__":
    sys.exit(main())
