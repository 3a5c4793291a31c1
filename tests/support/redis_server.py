"""A real ``redis-server`` on a free loopback port in a temporary directory, for tests.

    with RedisServer() as srv:          # or the `redis_server` pytest fixture (tests/store/conftest.py)
        url = srv.url                   # redis://127.0.0.1:<port>/0
        srv.stop(); srv.start()         # same port, e.g. to test reconnects

Skips the test (pytest.skip) when ``redis-server`` is not installed, unless ``CI`` is set, where
its absence is a failure.  Start, stop and the temporary directory: `tests/support/local_server.py`.
"""

from __future__ import annotations

import socket

from tests.support.local_server import LocalServer, start_or_skip


class RedisServer(LocalServer):
    """One ``redis-server`` process (no persistence, loopback only, its log in `log_path`)."""

    name = "redis-server"
    install = "apt-get install redis-server"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        return [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir, "--save", "",
                "--appendonly", "no", "--protected-mode", "no", "--daemonize", "no"]

    def ready(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")


def redis_server_or_skip() -> RedisServer:
    """A started server; skips the calling test when redis-server is missing (fails under CI)."""
    return start_or_skip(RedisServer)
