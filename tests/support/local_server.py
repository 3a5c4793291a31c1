"""One real server binary on a free loopback port in a temporary directory, for tests.

The base of `tests/support/redis_server.py` and `tests/support/prometheus_server.py`: a subclass
names its binary and install hint, gives its command line (`argv`) and says when it is ready
(`ready`); this module finds the binary, starts it with its output in `<dir>/<name>.log`, waits,
stops it (again and again, on the same port) and removes the directory on close.

    srv = RedisServer(); srv.start(); ...; srv.stop(); srv.start(); srv.close()
    srv = start_or_skip(RedisServer)     # pytest.skip when the binary is missing, a failure under CI
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from typing import IO, Callable, TypeVar

S = TypeVar("S", bound="LocalServer")


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """Start/stop one server process of `binary` on `port` (default: a free one)."""

    name = ""  # the binary looked up on PATH
    install = ""  # how to install it, for the error when it is missing
    start_timeout = 10.0

    def __init__(self, port: int | None = None, binary: str | None = None) -> None:
        self.binary = binary or shutil.which(self.name)
        if self.binary is None:
            raise FileNotFoundError(f"{self.name} not found ({self.install})")
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix=f"kvreuse-{self.name.split('-')[0]}-")
        self.log_path = os.path.join(self.dir, f"{self.name}.log")
        self.proc: subprocess.Popen | None = None
        self._log: IO[str] | None = None

    def argv(self) -> list[str]:
        """The server's command line."""
        raise NotImplementedError

    def ready(self) -> bool:
        """Whether the started server answers (an OSError counts as not yet)."""
        raise NotImplementedError

    def start(self: S, timeout: float | None = None) -> S:
        assert self.proc is None, "already running"
        timeout = self.start_timeout if timeout is None else timeout
        self._log = open(self.log_path, "a")
        self.proc = subprocess.Popen(self.argv(), stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()
                raise RuntimeError(f"{self.name} exited with {code}:\n{self.log_tail()}")
            try:
                if self.ready():
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"{self.name} not ready on port {self.port} within {timeout}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        if self._log is not None:
            self._log.flush()
        if not os.path.exists(self.log_path):
            return ""
        with open(self.log_path) as f:
            return "\n".join(f.read().splitlines()[-n:])

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self: S) -> S:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_or_skip(factory: Callable[[], S]) -> S:
    """`factory()` started; skips the calling test when its binary is missing (fails when ``CI`` is set)."""
    import pytest

    try:
        srv = factory()
    except FileNotFoundError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(e))
    return srv.start()
