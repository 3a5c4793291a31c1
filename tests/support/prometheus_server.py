"""A real ``prometheus`` (the Debian package's binary) on a free loopback port, for tests.

    with PrometheusServer(config) as prom:      # config: the prometheus.yml contents, as a dict
        prom.query('sum(rate(kvreuse_reused_tokens_total[5m]))')   # -> the result vector

Storage lives in a temporary directory removed on close.  Skips the test (pytest.skip) when
``prometheus`` is not installed, unless ``CI`` is set, where its absence is a failure.  Start, stop
and the temporary directory: `tests/support/local_server.py`.
"""

from __future__ import annotations

import json
import os
import urllib.parse
import urllib.request

import yaml

from tests.support.local_server import LocalServer, start_or_skip


class PrometheusServer(LocalServer):
    """One ``prometheus`` process scraping what `config` says."""

    name = "prometheus"
    install = "apt-get install prometheus"
    start_timeout = 30.0

    def __init__(self, config: dict, binary: str | None = None) -> None:
        super().__init__(binary=binary)
        self.config_path = os.path.join(self.dir, "prometheus.yml")
        with open(self.config_path, "w") as f:
            yaml.safe_dump(config, f)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        return [self.binary, f"--config.file={self.config_path}", f"--storage.tsdb.path={self.dir}/data",
                f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"]

    def ready(self) -> bool:
        urllib.request.urlopen(self.url + "/-/ready", timeout=1)
        return True

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


def prometheus_or_skip(config: dict) -> PrometheusServer:
    """A started server; skips the calling test when prometheus is missing (fails under CI)."""
    return start_or_skip(lambda: PrometheusServer(config))
