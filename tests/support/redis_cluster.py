"""A real 3-master Redis Cluster on loopback ports, for tests.

    with RedisCluster3() as cl:      # or redis_cluster_or_skip()
        cl.url                       # redis://127.0.0.1:<port of node 0>/0
        cl.kill(1)                   # SIGKILL one node (its slots become unreachable)

Nodes run with ``cluster-require-full-coverage no`` so the surviving nodes keep serving their
slots, and a short ``cluster-node-timeout``.  Skips without ``redis-server``/``redis-cli`` unless
``CI`` is set.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time



def _free_cluster_port() -> int:
    """A free port p with p + 10000 (its cluster bus port) free and below 65536."""
    rng = random.Random()
    for _ in range(200):
        p = rng.randrange(20000, 50000)
        try:
            for q in (p, p + 10000):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind(("127.0.0.1", q))
        except OSError:
            continue
        return p
    raise RuntimeError("no free port pair for a cluster node")


class RedisCluster3:
    def __init__(self) -> None:
        self.server = shutil.which("redis-server")
        self.cli = shutil.which("redis-cli")
        if self.server is None or self.cli is None:
            raise FileNotFoundError("redis-server / redis-cli not found (apt-get install redis-server redis-tools)")
        self.dir = tempfile.mkdtemp(prefix="kvreuse-cluster-")
        self.ports = [_free_cluster_port() for _ in range(3)]
        self.procs: list[subprocess.Popen | None] = [None] * 3

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def _cli(self, port: int, *args: str, timeout: float = 30) -> str:
        r = subprocess.run([self.cli, "-p", str(port), *args], capture_output=True, text=True, timeout=timeout)
        return r.stdout + r.stderr

    def start(self, timeout: float = 30.0) -> "RedisCluster3":
        for i, port in enumerate(self.ports):
            d = os.path.join(self.dir, str(port))
            os.makedirs(d)
            self.procs[i] = subprocess.Popen(
                [self.server, "--port", str(port), "--bind", "127.0.0.1", "--dir", d, "--save", "",
                 "--appendonly", "no", "--protected-mode", "no", "--cluster-enabled", "yes",
                 "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "1000",
                 "--cluster-require-full-coverage", "no", "--logfile", os.path.join(d, "redis.log")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        for port in self.ports:
            while "PONG" not in self._cli(port, "ping"):
                if time.monotonic() > deadline:
                    self.close()
                    raise TimeoutError(f"redis-server on {port} did not start")
                time.sleep(0.05)
        out = self._cli(self.ports[0], "--cluster", "create", *[f"127.0.0.1:{p}" for p in self.ports],
                        "--cluster-replicas", "0", "--cluster-yes")
        while not all("cluster_state:ok" in self._cli(p, "cluster", "info") for p in self.ports):
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError(f"cluster did not come up: {out}")
            time.sleep(0.1)
        return self

    def kill(self, i: int) -> None:
        p = self.procs[i]
        if p is not None:
            p.send_signal(signal.SIGKILL)
            p.wait()
            self.procs[i] = None

    def keys_per_node(self) -> list[int | None]:
        """DBSIZE of each node (None for a killed one)."""
        out = []
        for i, port in enumerate(self.ports):
            out.append(None if self.procs[i] is None else int(self._cli(port, "dbsize").split()[0]))
        return out

    def close(self) -> None:
        for i in range(3):
            p = self.procs[i]
            if p is not None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                self.procs[i] = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "RedisCluster3":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def redis_cluster_or_skip() -> RedisCluster3:
    import pytest

    try:
        cl = RedisCluster3()
    except FileNotFoundError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(e))
    return cl.start()
