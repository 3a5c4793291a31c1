"""`kvreuse serve` / `kvreuse stats`: argument handling (fast) and a real server (slow)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from connector_helpers import Server, free_port
from kvreuse.cli import format_stats, load_kvreuse_config, serve_argv


def test_serve_argv_turns_connector_on():
    argv = serve_argv("m", ["--port", "9"], {"policy": {"fidelity": "accurate"}})
    kv = json.loads(argv[argv.index("--kv-transfer-config") + 1])
    assert kv["kv_connector"] == "KVReuseConnector" and kv["kv_role"] == "kv_both"
    assert kv["kv_load_failure_policy"] == "recompute"
    assert kv["kv_connector_extra_config"]["policy"]["fidelity"] == "accurate"
    assert "--enable-prompt-tokens-details" in argv and argv[-2:] == ["--port", "9"]
    for given in (["--kv-transfer-config", "{}"], ["--kv_transfer_config", "{}"], ["--kv-transfer-config={}"],
                  ["--kv-transfer-config.kv_connector", "Other"]):   # every spelling vLLM's parser takes
        with pytest.raises(SystemExit, match="not --kv-transfer-config"):
            serve_argv("m", given, {})


def test_serve_argv_scheduler_and_async_scheduling():
    from kvreuse.connector.segmented_cls import SCHEDULER_CLS

    def sched(args):
        argv = serve_argv("m", args, {})
        given = [argv[i + 1] for i, a in enumerate(argv) if a == "--scheduler-cls"]
        return given, "--no-async-scheduling" in argv

    assert sched([]) == ([SCHEDULER_CLS], True)
    assert sched(["--scheduler-cls", SCHEDULER_CLS]) == ([SCHEDULER_CLS], True)     # given explicitly: the same
    assert sched(["--scheduler_cls=my.Sched"]) == ([], False)                         # the user's own scheduler
    assert sched(["--async-scheduling"]) == ([SCHEDULER_CLS], False)                  # refused at startup, clearly


def test_kvreuse_config_file_and_errors(tmp_path):
    f = tmp_path / "c.json"
    f.write_text('{"store": {"device_bytes": "64MiB"}}')
    assert load_kvreuse_config(str(f)) == {"store": {"device_bytes": "64MiB"}}
    with pytest.raises(SystemExit, match="policy.fidelity"):
        load_kvreuse_config('{"policy": {"fidelity": 3}}')
    with pytest.raises(SystemExit, match="JSON"):
        load_kvreuse_config("{nope")
    with pytest.raises(SystemExit, match="expected a JSON object"):
        load_kvreuse_config("[1, 2]")


def test_format_stats():
    s = {"kvreuse_reused_tokens_total": {"": 10.0},
         "kvreuse_chunk_lookups_total": {'result="hit"': 3.0, 'result="miss"': 1.0},
         "kvreuse_store_bytes": {'tier="device"': 2.0**20}, "kvreuse_store_budget_bytes": {'tier="device"': 2.0**30}}
    out = format_stats(s)
    assert "tokens reused        10" in out and "hit rate 75.0%" in out and "1.0 / 1024 MiB" in out


@pytest.mark.slow
def test_kvreuse_serve_and_stats_multilayer(tiny_2layer, tmp_path):
    """The CLI path (entry-point registration) on a 2-layer model; logprob divergence per policy is reported."""
    from openai import OpenAI

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_e2e_server import msgs, text

    port = free_port()
    argv = [sys.executable, "-m", "kvreuse.cli", "serve", str(tiny_2layer), "--port", str(port), "--host", "127.0.0.1",
            "--enforce-eager", "--gpu-memory-utilization", "0.3", "--max-model-len", "4096", "--dtype", "float32",
            "--kvreuse-config", '{"store": {"device_bytes": "256MiB"}}']
    s = Server(argv, port, tmp_path / "serve.log")
    try:
        s.wait_ready()
        c = OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        model = c.models.list().data[0].id

        def ask(m, **extra):
            r = c.chat.completions.create(model=model, messages=m, max_tokens=8, temperature=0, logprobs=True,
                                          extra_body=extra or None)
            return [t.logprob for t in r.choices[0].logprobs.content], r.usage.prompt_tokens_details.cached_tokens

        sys_, A, B, C = text(61, 40), text(62, 150), text(63, 150), text(64, 150)
        ask(msgs(sys_, [A, B, C], text(65, 8)))
        report = {}
        for name, docs in (("survival", [A, C]), ("reorder+blind", [C, B, A])):
            m = msgs(sys_, docs, text(66, 8))
            on, cached = ask(m)
            off, _ = ask(m, kv_transfer_params={"kvreuse": False}, cache_salt=name)
            report[name] = (cached, max(abs(a - b) for a, b in zip(on, off)))
            assert cached > 0
        print("\n2-layer float32, max |logprob on - off| per policy:", report)
        out = subprocess.run([sys.executable, "-m", "kvreuse.cli", "stats", s.url], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0 and "tokens reused" in out.stdout, out.stderr
        print(out.stdout)
    finally:
        s.stop()
