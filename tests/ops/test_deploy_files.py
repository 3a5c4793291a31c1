"""The deployment files in `server/` agree with one another and with kvreuse (fast; Docker is not run).

`promtool` (from the Debian `prometheus` package) checks the scrape config; the compose file mounts
files that exist, passes a kvreuse config the connector accepts, and wires Grafana to the
datasource uid and dashboard folder the dashboard and its provisioning use.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from kvreuse.connector.config import ConnectorConfig

SERVER = Path(__file__).resolve().parents[2] / "server"


def compose() -> dict:
    return yaml.safe_load((SERVER / "compose.yaml").read_text())


def test_promtool_accepts_the_scrape_config():
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            raise FileNotFoundError("promtool not found (apt-get install prometheus)")
        pytest.skip("promtool not found")
    out = subprocess.run([promtool, "check", "config", str(SERVER / "prometheus.yml")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_mounts_exist_and_config_is_valid(tmp_path):
    services = compose()["services"]
    assert {"vllm", "prometheus", "grafana"} <= set(services)
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            host = vol.split(":")[0]
            if host.startswith("."):
                assert (SERVER / host).exists(), f"{name} mounts {host}, which is not in the repository"
    cfg = json.loads(services["vllm"]["environment"]["KVREUSE_CONFIG"])
    cfg["disk_path"] = str(tmp_path)  # the container's path; validating would create it here
    assert ConnectorConfig.from_extra_config(cfg).isolation == "salted_only"
    scrape = yaml.safe_load((SERVER / "prometheus.yml").read_text())
    (target,) = [t for job in scrape["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert target.split(":")[0] in services, f"the scrape target {target} is not a compose service"


def test_grafana_provisioning_matches_the_dashboard():
    dash = json.loads((SERVER / "grafana" / "kvreuse.json").read_text())
    prov = SERVER / "grafana" / "provisioning"
    (ds,) = yaml.safe_load((prov / "datasources" / "prometheus.yaml").read_text())["datasources"]
    uids = {t["datasource"]["uid"] for p in dash["panels"] for t in p["targets"]} | \
        {p["datasource"]["uid"] for p in dash["panels"]}
    assert uids == {ds["uid"]}
    (provider,) = yaml.safe_load((prov / "dashboards" / "kvreuse.yaml").read_text())["providers"]
    mounts = [v.split(":")[1] for v in compose()["services"]["grafana"]["volumes"]]
    assert any(m.startswith(provider["options"]["path"] + "/") and m.endswith("kvreuse.json") for m in mounts)
    assert all(t["expr"] for p in dash["panels"] for t in p["targets"])
