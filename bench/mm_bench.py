"""The screenshot-agent trace: kvreuse vs vLLM prefix caching alone, in one run.

Two vLLM OpenAI servers on the same tiny random Qwen2-VL checkpoint (built offline), started by this
script and driven turn by turn, interleaved, so both see the same machine state:
  * kvreuse — `--kv-transfer-config` with KVReuseConnector (prefix caching stays on);
  * prefix  — stock vLLM, prefix caching on (its default), vision-encoder cache on (its default).
Each turn shows the last `--window` screenshots (oldest dropped, a new one added; each its own user
message with a caption) plus a question.  Per turn and arm it reports TTFT (streamed, median over
`--repeats` replays with fresh pictures each replay; replay 0 warms up), vision-encoder runs (images
the model's `embed_multimodal` encoded, counted in each server process by the worker-extension hook
of `tests/support/encoder_count.py`) and prefill tokens computed (prompt − cached).

    python bench/mm_bench.py [--layers 8 --hidden 512 --pixels 448 --turns 6 --window 4 --repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kvreuse.models.tiny_vl import TinyVLSpec, build_tiny_vl_model, vl_words  # noqa: E402
from kvreuse.models.trace import screenshot_trace  # noqa: E402
from server.demo import free_port, stop, ttft, wait_healthy  # noqa: E402
from tests.support.encoder_count import encoded_items, encoder_count_args, encoder_count_env  # noqa: E402

KV = {"kv_connector": "KVReuseConnector", "kv_connector_module_path": "kvreuse.connector", "kv_role": "kv_both",
      "kv_connector_extra_config": {"store": {"device_bytes": "2GiB"}}}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="qwen2_vl", choices=["qwen2_vl", "qwen2_5_vl"])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vision-depth", type=int, default=2)
    ap.add_argument("--vision-dim", type=int, default=128)
    ap.add_argument("--pixels", type=int, default=448, help="screenshot side; 448 -> 256 image tokens")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--pause", type=float, default=1.0,
                    help="seconds between requests, so one server's background work (kvreuse's saves) does not "
                         "land inside the other arm's measurement")
    a = ap.parse_args()
    from openai import OpenAI

    heads = a.hidden // 64
    q = 32 // 8  # mrope sections of head_dim 64: (8, 12, 12)
    spec = TinyVLSpec(arch=a.arch, num_layers=a.layers, hidden_size=a.hidden, num_heads=heads,
                      num_kv_heads=max(1, heads // 4), intermediate_size=4 * a.hidden, vocab_size=2048,
                      mrope_section=(2 * q, 3 * q, 3 * q), vision_depth=a.vision_depth, vision_dim=a.vision_dim,
                      vision_heads=2,
                      dtype=a.dtype, init_std=0.02, max_pixels=a.pixels * a.pixels)
    model_dir = build_tiny_vl_model(None, spec)
    tmp = tempfile.mkdtemp(prefix="kvreuse-mm-bench-")
    arms = {"kvreuse": KV, "prefix": None}
    procs, urls, enc_logs = {}, {}, {}
    try:
        for arm, kv in arms.items():
            port = free_port()
            enc_logs[arm] = os.path.join(tmp, f"{arm}.encoder")
            open(enc_logs[arm], "w").close()
            argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                    "--port", str(port), "--host", "127.0.0.1", "--enforce-eager", "--gpu-memory-utilization", "0.3",
                    "--max-model-len", "4096", "--dtype", a.dtype, "--enable-prompt-tokens-details", "--seed", "0",
                    "--limit-mm-per-prompt", json.dumps({"image": a.window, "video": 0}), *encoder_count_args()]
            if kv is not None:
                argv += ["--kv-transfer-config", json.dumps(kv)]
            env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                   **encoder_count_env(enc_logs[arm])}
            log = open(os.path.join(tmp, f"{arm}.log"), "w")
            procs[arm] = (subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                           start_new_session=True), log.name)
            urls[arm] = f"http://127.0.0.1:{port}"
        for arm in arms:
            wait_healthy(urls[arm], *procs[arm])
        clients = {arm: OpenAI(base_url=urls[arm] + "/v1", api_key="unused", timeout=600) for arm in arms}
        model = clients["kvreuse"].models.list().data[0].id
        ttfts = {arm: [[] for _ in range(a.turns)] for arm in arms}
        prefill = {arm: [0] * a.turns for arm in arms}
        encoded = {arm: [0] * a.turns for arm in arms}
        prompt_len = [0] * a.turns
        for rep in range(a.repeats + 1):  # replay 0 warms up; fresh screenshots every replay
            trace = screenshot_trace(a.turns, window=a.window, seed=100 + rep, words=vl_words(spec.vocab_size),
                                     size=(a.pixels, a.pixels))
            for t, turn in enumerate(trace):
                order = list(arms) if (rep + t) % 2 == 0 else list(arms)[::-1]  # no arm always goes first
                for arm in order:
                    time.sleep(a.pause)
                    e0 = encoded_items(enc_logs[arm])
                    s, prompt, cached = ttft(clients[arm], model, turn["messages"])
                    if rep:
                        ttfts[arm][t].append(s)
                        prefill[arm][t] = prompt - cached
                        encoded[arm][t] = encoded_items(enc_logs[arm]) - e0
                        prompt_len[t] = prompt
        print(f"model: tiny {a.arch}, {a.layers} layers, hidden {a.hidden}, vision {a.vision_depth}x{a.vision_dim}, "
              f"{a.dtype}; screenshots {a.pixels}x{a.pixels} "
              f"({(a.pixels // 28) ** 2} tokens each), window {a.window}, {a.turns} turns; median of {a.repeats} "
              f"replays; CPU ({os.cpu_count()} cores)")
        print(f"{'turn':>4} {'prompt':>6} | {'TTFT ms kvreuse':>15} {'prefix':>8} {'ratio':>6} | "
              f"{'encoder runs kvreuse':>20} {'prefix':>6} | {'prefill tok kvreuse':>19} {'prefix':>6}")
        ratios = []
        for t in range(a.turns):
            m = {arm: 1e3 * statistics.median(ttfts[arm][t]) for arm in arms}
            r = m["kvreuse"] / m["prefix"]
            if t:
                ratios.append(r)
            print(f"{t + 1:>4} {prompt_len[t]:>6} | {m['kvreuse']:>15.1f} {m['prefix']:>8.1f} {r:>6.2f} | "
                  f"{encoded['kvreuse'][t]:>20} {encoded['prefix'][t]:>6} | {prefill['kvreuse'][t]:>19} "
                  f"{prefill['prefix'][t]:>6}")
        tot = {arm: sum(encoded[arm]) for arm in arms}
        pre = {arm: sum(prefill[arm]) for arm in arms}
        print(f"median TTFT ratio kvreuse / prefix from turn 2: {statistics.median(ratios):.2f}; encoder runs per "
              f"replay: kvreuse {tot['kvreuse']}, prefix {tot['prefix']}; prefill tokens per replay: kvreuse "
              f"{pre['kvreuse']}, prefix {pre['prefix']}")
        subprocess.run([sys.executable, "-m", "kvreuse.cli", "stats", urls["kvreuse"]], check=False)
        return 0
    finally:
        for proc, _ in procs.values():
            stop(proc)


if __name__ == "__main__":
    sys.exit(main())
