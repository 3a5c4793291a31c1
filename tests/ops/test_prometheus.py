"""Monitoring that runs (slow): a real `prometheus` scrapes a real `kvreuse serve` with the shipped
scrape job (`server/prometheus.yml`); after a little reusable traffic, every query of every panel of
the shipped Grafana dashboard (`server/grafana/kvreuse.json`) returns data through Prometheus's
HTTP API.

The server is the shared one of `conftest.py`: budgets small enough that the traffic below claims,
demotes, evicts and rehydrates; one request injects a load failure.
"""

from __future__ import annotations

import copy
import json
import math
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.connector.test_e2e_server import ask, msgs, text
from tests.support.prometheus_server import prometheus_or_skip

pytestmark = pytest.mark.slow

SERVER_DIR = Path(__file__).resolve().parents[2] / "server"
SCRAPE_S = 2
WINDOW = "5m"  # stands for Grafana's $__rate_interval: the whole test fits in it


def panel_queries() -> list[tuple[str, str]]:
    """(panel title / legend, PromQL) of every target of every panel of the shipped dashboard."""
    dash = json.loads((SERVER_DIR / "grafana" / "kvreuse.json").read_text())
    return [(f"{p['title']} / {t.get('legendFormat', t['refId'])}", t["expr"].replace("$__rate_interval", WINDOW))
            for p in dash["panels"] for t in p["targets"]]


def scrape_config(target: str) -> dict:
    """The shipped prometheus.yml, pointed at `target` and scraping every second."""
    cfg = copy.deepcopy(yaml.safe_load((SERVER_DIR / "prometheus.yml").read_text()))
    every = f"{SCRAPE_S}s"
    cfg["global"].update(scrape_interval=every, scrape_timeout=every, evaluation_interval=every)
    (job,) = cfg["scrape_configs"]
    job["static_configs"] = [{"targets": [target]}]
    return cfg


@pytest.fixture(scope="module")
def prometheus(ops_server):
    prom = prometheus_or_skip(scrape_config(ops_server.url.removeprefix("http://")))
    try:
        yield prom
    finally:
        prom.close()


def reusable_traffic(s, seed: int) -> None:
    """Salted agent-style traffic: a sliding window of documents, revisits, a forced load failure."""
    sys_ = text(seed, 40)
    docs = [text(seed + 10 + i, 150) for i in range(10)]
    for i in range(8):                                   # saves, exact/survival claims, device pressure
        ask(s, msgs(sys_, docs[i:i + 3], text(seed + 30 + i, 8)), cache_salt="ops")
    for i in range(3):                                   # early documents again: back from disk
        ask(s, msgs(sys_, [docs[i + 1], docs[i]], text(seed + 50 + i, 8)), cache_salt="ops")
    ask(s, msgs(sys_, [docs[7], docs[6]], text(seed + 60, 8)), cache_salt="ops",
        kv_transfer_params={"kvreuse": {"inject_load_failure": True}})


def _wait_scraped(prom, server, timeout: float = 120.0) -> None:
    """Until Prometheus holds the server's current prompt-token count, then one scrape more."""
    text_ = urllib.request.urlopen(server.url + "/metrics", timeout=30).read().decode()
    want = sum(float(line.rpartition(" ")[2]) for line in text_.splitlines()
               if line.startswith("vllm:prompt_tokens_total{"))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = prom.query("sum(vllm:prompt_tokens_total)")
        if got and float(got[0]["value"][1]) >= want:
            time.sleep(2 * SCRAPE_S)
            return
        time.sleep(SCRAPE_S)
    raise AssertionError(f"Prometheus never scraped the traffic: {prom.targets_up()}")


def test_every_dashboard_panel_returns_data(ops_server, prometheus):
    s = ops_server
    # two rounds, each scraped before the next (a loaded machine can make a scrape late): every
    # series then has samples before and after its counters moved, so every rate has a value
    _wait_scraped(prometheus, s)
    for seed in (900, 1900):
        reusable_traffic(s, seed)
        _wait_scraped(prometheus, s)
    (target,) = prometheus.targets_up()
    assert target["health"] == "up", target
    empty = []
    for name, expr in panel_queries():
        values = [float(r["value"][1]) for r in prometheus.query(expr)]
        if not any(math.isfinite(v) for v in values):
            empty.append(f"{name}: {expr} -> {values}")
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
    # and what the budget panel shows held at every scrape: no tier above its budget
    peak = f"max_over_time(kvreuse_store_bytes[{WINDOW}])"
    assert len(prometheus.query(f"{peak} <= kvreuse_store_budget_bytes")) >= 3, "tiers matched to their budgets"
    over = prometheus.query(f"{peak} > kvreuse_store_budget_bytes")
    assert not over, f"a tier exceeded its budget: {over}"
