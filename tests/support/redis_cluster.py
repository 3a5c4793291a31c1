"""A real 3-master Redis Cluster on loopback ports, for tests.

    with RedisCluster3() as cl:      # or redis_cluster_or_skip()
        cl.url                       # redis://127.0.0.1:<port of node 0>/0
        cl.kill(1)                   # SIGKILL one node (its slots become unreachable)

Each node is a `tests/support/redis_server.py` server (start, stop, its directory and log) with
cluster mode on, ``cluster-require-full-coverage no`` so the surviving nodes keep serving their
slots, and a short ``cluster-node-timeout``.  Skips without ``redis-server``/``redis-cli`` unless
``CI`` is set.
"""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import time

from tests.support.local_server import start_or_skip
from tests.support.redis_server import RedisServer


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


class ClusterNode(RedisServer):
    """One cluster-enabled ``redis-server``; its cluster bus listens on its port + 10000."""

    def __init__(self) -> None:
        super().__init__(port=_free_cluster_port())

    def argv(self) -> list[str]:
        return super().argv() + ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                 "--cluster-node-timeout", "1000", "--cluster-require-full-coverage", "no"]

    def kill(self) -> None:
        """SIGKILL: no shutdown, as a crashed node."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.stop()


class RedisCluster3:
    def __init__(self) -> None:
        self.cli = shutil.which("redis-cli")
        if self.cli is None:
            raise FileNotFoundError("redis-cli not found (apt-get install redis-tools)")
        self.nodes = [ClusterNode() for _ in range(3)]

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def _cli(self, port: int, *args: str, timeout: float = 30) -> str:
        r = subprocess.run([self.cli, "-p", str(port), *args], capture_output=True, text=True, timeout=timeout)
        return r.stdout + r.stderr

    def start(self, timeout: float = 30.0) -> "RedisCluster3":
        deadline = time.monotonic() + timeout
        try:
            for n in self.nodes:
                n.start(timeout)
            out = self._cli(self.ports[0], "--cluster", "create", *[f"127.0.0.1:{p}" for p in self.ports],
                            "--cluster-replicas", "0", "--cluster-yes")
            while not all("cluster_state:ok" in self._cli(p, "cluster", "info") for p in self.ports):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"cluster did not come up: {out}")
                time.sleep(0.1)
        except BaseException:
            self.close()
            raise
        return self

    def kill(self, i: int) -> None:
        self.nodes[i].kill()

    def keys_per_node(self) -> list[int | None]:
        """DBSIZE of each node (None for a killed one)."""
        return [None if n.proc is None else int(self._cli(n.port, "dbsize").split()[0]) for n in self.nodes]

    def close(self) -> None:
        for n in self.nodes:
            n.close()

    def __enter__(self) -> "RedisCluster3":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def redis_cluster_or_skip() -> RedisCluster3:
    """A started cluster; skips the calling test when redis-server or redis-cli is missing (fails under CI)."""
    return start_or_skip(RedisCluster3)
