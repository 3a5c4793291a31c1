"""vLLM servers on loopback for the connector's end-to-end tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from kvreuse.cli import parse_kvreuse_metrics


PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A vLLM OpenAI server subprocess (`python -m vllm.entrypoints.openai.api_server` or `kvreuse serve`)."""

    def __init__(self, argv: list[str], port: int, log: Path, env: dict[str, str] | None = None) -> None:
        self.port, self.log = port, log
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), **(env or {})}
        self._out = open(log, "w")
        self.proc = subprocess.Popen(argv, stdout=self._out, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 240.0) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2)
                return
            except OSError:
                time.sleep(1)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.tail()}")

    def wait_exit(self, timeout: float = 240.0) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.stop()

    def tail(self, n: int = 60) -> str:
        self._out.flush()
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def metrics(self) -> dict[str, float]:
        """kvreuse_* samples of `/metrics`, keyed by the sample line's name and labels (engine/model dropped)."""
        text = urllib.request.urlopen(self.url + "/metrics", timeout=10).read().decode()
        return parse_kvreuse_metrics(text)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()


def vllm_argv(model: Path, port: int, *, kv: dict | None, dtype: str = "float32", extra: list[str] = ()) -> list[str]:
    argv = [PY, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--port", str(port),
            "--host", "127.0.0.1", "--enforce-eager", "--gpu-memory-utilization", "0.3", "--max-model-len", "4096",
            "--enable-prompt-tokens-details", "--dtype", dtype, "--seed", "0", *extra]
    if kv is not None:
        argv += ["--kv-transfer-config", json.dumps(kv)]
    return argv


def running_pair(model: Path, logs: Path, name: str, kv: dict, *, on_extra: list[str] = (),
                 off_extra: list[str] = (), dtype: str = "float32"):
    """Yield (kvreuse on, vLLM alone) servers on `model`, both ready; both stopped afterwards (a fixture body)."""
    p_on, p_off = free_port(), free_port()
    on = Server(vllm_argv(model, p_on, kv=kv, dtype=dtype, extra=list(on_extra)), p_on, logs / f"{name}-on.log")
    off = Server(vllm_argv(model, p_off, kv=None, dtype=dtype, extra=list(off_extra)), p_off, logs / f"{name}-off.log")
    try:
        on.wait_ready()
        off.wait_ready()
        yield on, off
    finally:
        on.stop()
        off.stop()


def start(argv: list[str], port: int, log: Path) -> Server:
    s = Server(argv, port, log)
    s.wait_ready()
    return s


def assert_same(a, b, tol: float = 1e-4) -> float:
    """Same greedy text and logprobs within `tol` (`a`, `b`: (text, logprobs, ...)); returns the largest difference."""
    assert a[0] == b[0], f"greedy tokens differ: {a[0]!r} vs {b[0]!r}"
    worst = max(abs(x - y) for x, y in zip(a[1], b[1]))
    assert worst <= tol, f"logprobs differ by {worst:.3g}"
    return worst
