"""`make demo`: the embedded tiny model behind `kvreuse serve`, and a short agent session.

Builds the default tiny checkpoint offline, starts `kvreuse serve` on it, replays a
sliding-window agent session through the openai client and prints, per turn, the prompt tokens
kvreuse placed from its store and the time saved: each turn is also sent once with kvreuse opted
out (and a fresh cache salt, so vLLM's prefix cache cannot help either) as the baseline.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

from kvreuse.models import TinySpec, build_tiny_model
from kvreuse.models.trace import agent_trace

# Small enough to build offline in seconds, large enough that prefill (not fixed per-request cost)
# dominates TTFT on a 2-core CPU, so the time kvreuse saves is visible.
DEMO_MODEL = TinySpec(num_layers=8, hidden_size=512, num_heads=8, num_kv_heads=2, head_dim=64,
                      intermediate_size=2048, vocab_size=4096, dtype="bfloat16", init_std=0.02)


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, log: str, timeout: float = 600) -> None:
    """Block until the server at `url` answers /health; exit with its log tail if it dies or hangs."""
    t0 = time.time()
    while True:
        if proc.poll() is not None:
            raise SystemExit(open(log).read()[-4000:])
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return
        except OSError:
            if time.time() - t0 > timeout:
                raise SystemExit(f"server did not start; see {log}")
            time.sleep(1)


def stop(proc: subprocess.Popen) -> None:
    """Terminate a server process, killing it if it does not exit within 30 s."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def ttft(client, model: str, msgs, **extra) -> tuple[float, int, int]:
    """(seconds to first token, prompt tokens, cached tokens) of one streamed request."""
    t0 = time.perf_counter()
    first = None
    usage = None
    for ev in client.chat.completions.create(model=model, messages=msgs, max_tokens=4, temperature=0, stream=True,
                                             stream_options={"include_usage": True}, extra_body=extra or None):
        if first is None and ev.choices and ev.choices[0].delta.content:
            first = time.perf_counter() - t0
        if ev.usage is not None:
            usage = ev.usage
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return (first if first is not None else time.perf_counter() - t0), usage.prompt_tokens, cached or 0


def main() -> int:
    from openai import OpenAI

    model_dir = build_tiny_model(None, DEMO_MODEL)
    port = free_port()
    log = tempfile.NamedTemporaryFile("w", prefix="kvreuse-demo-", suffix=".log", delete=False)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    argv = [sys.executable, "-m", "kvreuse.cli", "serve", str(model_dir), "--port", str(port), "--host", "127.0.0.1",
            "--enforce-eager", "--gpu-memory-utilization", "0.3", "--max-model-len", "4096", "--dtype", "float32"]
    print(f"kvreuse demo: starting `kvreuse serve {model_dir}` (log: {log.name}) ...", flush=True)
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log.name, timeout=300)
        client = OpenAI(base_url=url + "/v1", api_key="unused")
        model = client.models.list().data[0].id
        # warm-up (opted out, own salt) so the first timed request does not pay one-time start-up costs
        for msgs in agent_trace(1, seed=99):
            ttft(client, model, msgs, kv_transfer_params={"kvreuse": False}, cache_salt=uuid.uuid4().hex)
        print(f"\n{'turn':>4} {'prompt':>7} {'reused':>7} {'share':>6} {'TTFT kvreuse':>13} {'TTFT baseline':>14} {'saved':>8}")
        for t, msgs in enumerate(agent_trace(6, seed=7)):
            base, _, _ = ttft(client, model, msgs, kv_transfer_params={"kvreuse": False}, cache_salt=uuid.uuid4().hex)
            got, prompt, cached = ttft(client, model, msgs)
            print(f"{t + 1:>4} {prompt:>7} {cached:>7} {cached / prompt:>6.0%} {1e3 * got:>10.1f} ms {1e3 * base:>11.1f} ms "
                  f"{1e3 * (base - got):>5.1f} ms")
        print("\n`kvreuse stats` of this server:")
        subprocess.run([sys.executable, "-m", "kvreuse.cli", "stats", url], check=False)
        return 0
    finally:
        stop(proc)


if __name__ == "__main__":
    sys.exit(main())
