"""The servers compared: vLLM alone (the reference), vLLM without prefix caching (the noise floor), and
kvreuse under given configurations.  Each arm is a fresh server process on the same checkpoint, dtype and
vLLM arguments (`bench.serve_common.server_argv`), started only after the previous one stopped."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from bench.fidelity.client import run_workload, warm
from bench.fidelity.workloads import Request
from bench.serve_common import serve


@dataclass(frozen=True)
class Arm:
    """`kind`: "prefix" (`vllm.entrypoints.openai.api_server`) or "kvreuse" (`kvreuse.cli serve`);
    `extra`: vLLM arguments for this arm only."""

    name: str
    kind: str
    kvreuse_config: dict | None = None
    extra: tuple[str, ...] = ()
    request_extra: dict = field(default_factory=dict)  # extra body of every request (e.g. kv_transfer_params)

    def __post_init__(self) -> None:
        if self.kind not in ("prefix", "kvreuse"):
            raise ValueError(f"arm {self.name}: kind must be 'prefix' or 'kvreuse', got {self.kind!r}")


VLLM = Arm("vllm", "prefix")
VLLM_NOPC = Arm("vllm-nopc", "prefix", extra=("--no-enable-prefix-caching",))
DEFAULT_KVREUSE_CONFIGS = ({"policy": {"fidelity": "exact"}}, {"policy": {"fidelity": "accurate"}},
                           {"policy": {"fidelity": "fast"}})


def kvreuse_arm_name(cfg: dict) -> str:
    """`kvreuse-<fidelity>[-r<repair_tokens>]`, `kvreuse-default` for {}, else kvreuse-<compact JSON>."""
    pol = cfg.get("policy", {}) if isinstance(cfg.get("policy"), dict) else {}
    if not cfg:
        return "kvreuse-default"
    if set(cfg) == {"policy"} and set(pol) <= {"fidelity", "repair_tokens"} and pol:
        name = "kvreuse-" + str(pol.get("fidelity", "default"))
        return name + (f"-r{pol['repair_tokens']}" if "repair_tokens" in pol else "")
    return "kvreuse-" + json.dumps(cfg, separators=(",", ":"), sort_keys=True)


def parse_arm(spec: str) -> Arm:
    """`NAME=JSON`: a kvreuse arm named NAME with that `--kvreuse-config`."""
    name, sep, text = spec.partition("=")
    if not sep or not name:
        raise ValueError(f"--arm: expected NAME=JSON, got {spec!r}")
    cfg = json.loads(text)
    if not isinstance(cfg, dict):
        raise ValueError(f"--arm {name}: the config must be a JSON object")
    return Arm(name, "kvreuse", cfg)


def run_arm(arm: Arm, model_dir: str, tokenizer, workloads: dict[str, list[Request]], *, dtype: str,
            log_dir: str | None = None, warmup: list[Request] = (), max_model_len: int = 4096) -> dict:
    """Start `arm`'s server, warm it up, run every workload in turn (one request at a time), stop it."""
    out: dict = {"kind": arm.kind, "kvreuse_config": arm.kvreuse_config, "extra": list(arm.extra), "workloads": {}}
    with serve(arm.kind, model_dir, dtype=dtype, kvreuse_config=arm.kvreuse_config, extra=list(arm.extra),
               log_dir=log_dir, max_model_len=max_model_len) as srv:
        out["command"] = srv.command()
        out["log"] = srv.log
        warm(srv.url, model_dir, tokenizer, list(warmup))
        for name, reqs in workloads.items():
            t0 = time.time()
            out["workloads"][name] = run_workload(srv.url, model_dir, tokenizer, reqs,
                                                  extra_body=arm.request_extra or None)
            print(f"[{time.strftime('%H:%M:%S')}] {arm.name}: {name} ({len(reqs)} requests) "
                  f"{time.time() - t0:.0f} s", flush=True)
    return out
