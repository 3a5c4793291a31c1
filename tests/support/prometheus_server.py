"""A real ``prometheus`` (the Debian package's binary) on a free loopback port, for tests.

    with PrometheusServer(config) as prom:      # config: the prometheus.yml contents, as a dict
        prom.query('sum(rate(kvreuse_reused_tokens_total[5m]))')   # -> the result vector

Storage lives in a temporary directory removed on close.  Skips the test (pytest.skip) when
``prometheus`` is not installed, unless ``CI`` is set, where its absence is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request

import yaml

from tests.connector.connector_helpers import free_port


class PrometheusServer:
    """Start/stop one ``prometheus`` process scraping what `config` says."""

    def __init__(self, config: dict, binary: str | None = None) -> None:
        self.binary = binary or shutil.which("prometheus")
        if self.binary is None:
            raise FileNotFoundError("prometheus not found (apt-get install prometheus)")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="kvreuse-prometheus-")
        self.config_path = os.path.join(self.dir, "prometheus.yml")
        with open(self.config_path, "w") as f:
            yaml.safe_dump(config, f)
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "PrometheusServer":
        assert self.proc is None, "already running"
        self._log = open(os.path.join(self.dir, "prometheus.log"), "w")
        args = [self.binary, f"--config.file={self.config_path}", f"--storage.tsdb.path={self.dir}/data",
                f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"]
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                urllib.request.urlopen(self.url + "/-/ready", timeout=1)
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"prometheus not ready on port {self.port} within {timeout}s:\n{self.log_tail()}")

    def query(self, expr: str) -> list[dict]:
        """The result of an instant query (`/api/v1/query`): a list of {"metric", "value"}."""
        url = self.url + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        body = json.loads(urllib.request.urlopen(url, timeout=10).read())
        if body.get("status") != "success":
            raise RuntimeError(f"query {expr!r} failed: {body}")
        return body["data"]["result"]

    def targets_up(self) -> list[dict]:
        """Active scrape targets and their health (`/api/v1/targets`)."""
        body = json.loads(urllib.request.urlopen(self.url + "/api/v1/targets", timeout=10).read())
        return body["data"]["activeTargets"]

    def log_tail(self, n: int = 40) -> str:
        if self._log is not None:
            self._log.flush()
        path = os.path.join(self.dir, "prometheus.log")
        return "\n".join(open(path).read().splitlines()[-n:]) if os.path.exists(path) else ""

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
        self._log.close()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "PrometheusServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def prometheus_or_skip(config: dict) -> PrometheusServer:
    """A started server; skips the calling test when prometheus is missing (fails under CI)."""
    import pytest

    try:
        srv = PrometheusServer(config)
    except FileNotFoundError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(e))
    return srv.start()
