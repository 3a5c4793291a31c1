"""The `kvreuse serve` of the operations tests: small budgets on every tier, salted_only.

The 1-layer float32 tiny model (reuse must be exact) with a device tier that holds only a few
chunks, a disk tier and a real Redis tier behind it, so ordinary traffic demotes, evicts and
rehydrates; `isolation: "salted_only"`, so only requests with a `cache_salt` store or place chunks;
fault injection on (a request may ask for a failed load); the cost model's rates fixed (on a model
this small, learned rates would find that no placement pays, and these tests are about the store).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kvreuse.models import TinySpec, build_tiny_model
from tests.connector.connector_helpers import Server, free_port

# about 45 KiB of KV per 150-word document on this model (fp32, 1 layer, 1 KV head of 32)
DEVICE_BYTES, DISK_BYTES, REDIS_BYTES = "256KiB", "1MiB", "64MiB"


def ops_config(disk: Path, redis_url: str) -> dict:
    return {"device_bytes": DEVICE_BYTES, "disk_path": str(disk), "disk_bytes": DISK_BYTES,
            "redis_url": redis_url, "redis_bytes": REDIS_BYTES, "isolation": "salted_only",
            "cost": {"learn": False}, "allow_fault_injection": True, "policy": {"fidelity": "fast"}}


def start_ops_server(root: Path, redis_url: str) -> Server:
    """Build the model under `root` and start `kvreuse serve` on it (returns once healthy)."""
    model = build_tiny_model(root / "l1", TinySpec(num_layers=1, hidden_size=64, num_heads=2, num_kv_heads=1,
                                                   head_dim=32))
    port = free_port()
    argv = [sys.executable, "-m", "kvreuse.cli", "serve", str(model),
            "--kvreuse-config", json.dumps(ops_config(root / "disk", redis_url)),
            "--port", str(port), "--host", "127.0.0.1", "--enforce-eager", "--gpu-memory-utilization", "0.3",
            "--max-model-len", "4096", "--dtype", "float32", "--seed", "0"]
    server = Server(argv, port, root / "server.log")
    server.wait_ready()
    return server
