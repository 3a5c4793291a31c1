"""Load test: N concurrent clients for a while against `kvreuse serve` under tiny tier budgets.

    python bench/load_test.py --clients 32 --duration 600 --json bench/results/load_test.json

One `kvreuse serve` (segmented prefill) on a tiny offline model with a device tier of a few
chunks, a host tier and a disk tier in a temporary directory, so demotion, eviction and
rehydration happen all the time.  N client threads run the mixed trace of `load_trace.py`
(raw-text and chat agent windows, RAG prompts joined by blank lines and by spaces, reordered
passages, cancelled requests, disconnects mid-stream) until the duration is up.  Meanwhile a
sampler reads, every second, `kvreuse_store_bytes` and `kvreuse_store_budget_bytes` from
`/metrics` and the VmRSS of the server and its engine process.  Afterwards the server is
stopped, vLLM alone is started on the same model, and every completed request is replayed on
it (greedy) and compared: text, and logprobs within `--tol`.

Checks (the JSON's "checks"; exit status 1 if one fails): no HTTP 5xx, transport error or
ERROR/Traceback line in the server log; no sampled tier above its budget; RSS growth after
warm-up flat: over the last half of the run after warm-up, the least-squares slope of the server
tree's RSS within `--rss-slope` MiB/min (with kvreuse the worker's RSS climbs for the first minutes
towards the level vLLM alone's worker reaches within its first minute; `--rss-baseline` runs the
same trace on vLLM alone and checks that the kvreuse server's RSS stays within `--rss-margin` of
it); every completed answer identical to vLLM alone under `--fidelity exact` (the default), on any
model (`--model-layers 8`: a chunk's KV depends on what precedes it, so KV placed from another
context shows), and at every fidelity on the 1-layer float32 model (where it does not: the
mechanics); at `accurate` or `fast` on a deeper model the divergence is reported, not checked.
A differing greedy token passes only at a near tie: the reference gives both tokens logprobs
within `--tol` (counted as `near_ties`; 1 in ~5,000 answers on this trace).

Not covered: captioned images — a vision-language model needs its own server; the captioned
screenshot path is exercised by `bench/caption_bench.py` and the connector's multimodal tests.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from load_trace import Client, Outcome, Trace, replay  # noqa: E402
from serve_common import delta, labelled, scrape, serve, settle, write_json  # noqa: E402

LOG_ERROR = re.compile(r"\bERROR\b|Traceback|EngineDeadError|EngineCore.*(died|failed)")
EVENT_COUNTERS = {"evictions": ("kvreuse_evictions_total", "tier"),
                  "rehydrations": ("kvreuse_rehydrations_total", "tier"),
                  "claims": ("kvreuse_claims_total", "policy"),
                  "segments": ("kvreuse_segments_total", "kind")}
PLAIN_COUNTERS = {"demotions": "kvreuse_demotions_total", "dropped_saves": "kvreuse_dropped_saves_total",
                  "load_failures": "kvreuse_load_failures_total", "reused_tokens": "kvreuse_reused_tokens_total",
                  "saved_chunks": "kvreuse_saved_chunks_total", "gap_tokens": "kvreuse_gap_tokens_total"}


def build_model(root: Path, layers: int, dtype: str) -> Path:
    from kvreuse.models import TinySpec, build_tiny_model

    if layers == 1 and dtype == "float32":  # the connector tests' exact model
        spec = TinySpec(num_layers=1, hidden_size=64, num_heads=2, num_kv_heads=1, head_dim=32)
    else:
        spec = TinySpec(num_layers=layers, hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=64,
                        intermediate_size=512, dtype=dtype, init_std=0.02)
    return build_tiny_model(root / spec.tag(), spec)


class Sampler(threading.Thread):
    """Every `period` s: each tier's store bytes and budget from /metrics, and the server tree's RSS."""

    def __init__(self, url: str, pid: int, period: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.url, self.proc, self.period = url, psutil.Process(pid), period
        self.t0 = time.time()
        self.budget: list[dict] = []   # {"t": s, "tiers": {tier: (bytes, budget)}}
        self.rss: list[tuple[float, float]] = []  # (t, MiB) of the whole tree
        self.rss_by_proc: list[tuple[float, dict[str, float]]] = []  # (t, {"pid name": MiB})
        self.errors = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.period):
            t = time.time() - self.t0
            try:
                m = scrape(self.url)
                row = {}
                for k, v in m.items():
                    if k.startswith("kvreuse_store_bytes{"):
                        tier = k.split('"')[1]
                        row[tier] = (v, m.get(f'kvreuse_store_budget_bytes{{tier="{tier}"}}', 0.0))
                self.budget.append({"t": t, "tiers": row})
            except OSError:
                self.errors += 1
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                mem = {f"{p.pid} {p.name()}": p.memory_info() for p in procs if p.is_running()}
                by = {k: m.rss / 2**20 for k, m in mem.items()}
                by.update({f"{k} file+shmem": m.shared / 2**20 for k, m in mem.items()})
                self.rss.append((t, sum(m.rss for m in mem.values()) / 2**20))
                self.rss_by_proc.append((t, by))
            except psutil.Error:
                pass

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def budget_report(self) -> dict:
        out = {}
        for row in self.budget:
            for tier, (used, budget) in row["tiers"].items():
                r = out.setdefault(tier, {"budget_bytes": budget, "max_bytes": 0.0, "over_samples": 0})
                r["max_bytes"] = max(r["max_bytes"], used)
                r["over_samples"] += int(budget > 0 and used > budget)
        return {"samples": len(self.budget), "scrape_errors": self.errors, "tiers": out}

    def rss_report(self, warmup_s: float) -> dict:
        post = [(t, m) for t, m in self.rss if t >= warmup_s]
        if len(post) < 10:
            return {"samples": len(self.rss), "post_warmup_samples": len(post)}
        t, m = np.array(post).T
        slope = float(np.polyfit(t / 60, m, 1)[0])
        head, tail = float(np.median(m[:5])), float(np.median(m[-5:]))
        half = len(m) // 2
        halves = [float(np.polyfit(t[:half] / 60, m[:half], 1)[0]), float(np.polyfit(t[half:] / 60, m[half:], 1)[0])]
        first = next(by for tt, by in self.rss_by_proc if tt >= warmup_s)
        last = self.rss_by_proc[-1][1]
        per_proc = {name: {"mib_at_warmup": first.get(name), "mib_at_end": last[name]} for name in last}
        return {"samples": len(self.rss), "post_warmup_samples": len(post), "warmup_s": warmup_s,
                "rss_mib_at_warmup": head, "rss_mib_at_end": tail, "rss_mib_max": float(m.max()),
                "slope_mib_per_min": slope, "slope_halves_mib_per_min": halves, "growth_mib": tail - head,
                "fitted_growth_mib": float(slope * (t[-1] - t[0]) / 60), "by_process": per_proc}


def drive(url: str, model: str, trace: Trace, clients: int, duration: float) -> list[Outcome]:
    """Run `clients` client threads against `url` for `duration` seconds; every request's outcome."""
    deadline = time.time() + duration
    outs: list[Outcome] = []
    lock = threading.Lock()

    def loop(i: int) -> None:
        c = Client(trace, i, url, model)
        try:
            while time.time() < deadline:
                o = c.send()
                with lock:
                    outs.append(o)
        finally:
            c.close()

    with ThreadPoolExecutor(clients) as ex:
        list(ex.map(loop, range(clients)))
    return outs


def log_tail(path: str, lines: int = 40) -> str:
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])


def log_errors(path: str) -> list[str]:
    return [ln.strip() for ln in Path(path).read_text(errors="replace").splitlines() if LOG_ERROR.search(ln)]


def compare(url: str, outs: list[Outcome], tol: float, workers: int = 4) -> dict:
    """Replay each distinct completed request on `url`; mismatch counts and the worst logprob gap."""
    done = {json.dumps(o.body, sort_keys=True): o for o in outs if o.status == "done"}
    http = httpx.Client(base_url=url, timeout=600)

    def one(o: Outcome) -> dict:
        text, lps, toks, top = replay(http, o)
        same_text = text == o.text and len(lps) == len(o.logprobs)
        ok, tie, gaps = judge(o.tokens, o.logprobs, toks, lps, top, tol)
        gap = max(gaps, default=0.0)
        return {"kind": o.kind, "same_text": same_text, "gap": gap, "ok": ok and (same_text or tie), "tie": tie,
                "got": o.text, "want": text, "gaps": gaps, "got_logprobs": o.logprobs, "want_logprobs": lps,
                "cached_tokens": o.cached_tokens, "prompt_tokens": o.prompt_tokens, "t_start": o.t_start,
                "response_id": o.response_id, "endpoint": o.endpoint, "body": o.body}
    with ThreadPoolExecutor(workers) as ex:
        rows = list(ex.map(one, done.values()))
    http.close()
    bad = [r for r in rows if not r["ok"]]
    return {"replayed": len(rows), "identical": len(rows) - len(bad), "near_ties": sum(r["tie"] for r in rows),
            "text_mismatches":
            sum(not r["same_text"] for r in rows), "max_logprob_gap": max((r["gap"] for r in rows), default=0.0),
            "by_kind": {k: sum(r["ok"] for r in rows if r["kind"] == k) for k in sorted({r["kind"] for r in rows})},
            "examples": bad[:5]}


def log_lines_of(log: str | None, response_id: str | None, limit: int = 40) -> list[str]:
    """The server log's lines naming the request whose response id is `response_id` (its engine request ids
    start with it), e.g. kvreuse's failed loads."""
    if not log or not response_id or not os.path.exists(log):
        return []
    with open(log, errors="replace") as f:
        return [line.rstrip("\n") for line in f if response_id in line][:limit]


def judge(got_tok: list[str], got_lp: list[float], want_tok: list[str], want_lp: list[float], want_top: list[dict],
          tol: float) -> tuple[bool, bool, list[float]]:
    """(ok, near_tie, logprob gaps compared).  Tokens and logprobs must agree within `tol` up to the first
    differing token; a differing token is accepted only at a near tie: the reference gives the token
    kvreuse chose a logprob within `tol` of its own choice and of kvreuse's (greedy picks either)."""
    gaps = []
    for i, (gt, wt) in enumerate(zip(got_tok, want_tok)):
        gaps.append(abs(got_lp[i] - want_lp[i]))
        if gt != wt:
            alt = want_top[i].get(gt) if i < len(want_top) else None
            tie = alt is not None and abs(alt - want_lp[i]) <= tol and abs(alt - got_lp[i]) <= tol
            return tie and max(gaps[:-1], default=0.0) <= tol, tie, gaps
    return len(got_tok) == len(want_tok) and max(gaps, default=0.0) <= tol, False, gaps


def summarize(outs: list[Outcome], duration: float) -> dict:
    done = [o for o in outs if o.status == "done"]
    ttft = sorted(o.ttft_s for o in done if o.ttft_s is not None)
    q = lambda p: 1e3 * ttft[min(len(ttft) - 1, int(p * len(ttft)))] if ttft else None  # noqa: E731
    prompt = sum(o.prompt_tokens or 0 for o in done)
    by = {}
    for o in outs:
        by.setdefault(o.kind, {}).setdefault(o.status, 0)
        by[o.kind][o.status] += 1
    return {"requests": len(outs), "completed": len(done), "requests_per_s": len(outs) / duration,
            "completed_per_s": len(done) / duration, "ttft_ms_p50": q(0.5), "ttft_ms_p99": q(0.99),
            "ttft_ms_mean": 1e3 * statistics.mean(ttft) if ttft else None,
            "cached_share": sum(o.cached_tokens or 0 for o in done) / prompt if prompt else None,
            "by_kind": by, "http_5xx": sum(1 for o in outs if (o.http_status or 0) >= 500),
            "http_4xx": sum(1 for o in outs if 400 <= (o.http_status or 0) < 500),
            "client_errors": [o.error for o in outs if o.status == "error"][:5],
            "errors": sum(o.status == "error" for o in outs)}


def store_events(d: dict[str, float]) -> dict:
    out = {name: labelled(d, fam, lab) for name, (fam, lab) in EVENT_COUNTERS.items()}
    out.update({name: int(d.get(fam, 0)) for name, fam in PLAIN_COUNTERS.items()})
    return out


def print_report(r: dict) -> None:
    s, e = r["load"], r["store_events"]
    print(f"\n{'clients':>8} {'duration':>8} {'req':>6} {'done':>6} {'req/s':>6} {'TTFT p50':>9} {'p99':>8}")
    print(f"{r['args']['clients']:>8} {r['args']['duration']:>7.0f}s {s['requests']:>6} {s['completed']:>6} "
          f"{s['requests_per_s']:>6.2f} {s['ttft_ms_p50'] or 0:>7.1f}ms {s['ttft_ms_p99'] or 0:>6.1f}ms")
    print("\nstore event            count")
    for name in ("evictions", "demotions", "rehydrations", "dropped_saves", "load_failures", "claims", "segments",
                 "reused_tokens", "saved_chunks", "gap_tokens"):
        v = e[name]
        print(f"{name:<20} {sum(v.values()) if isinstance(v, dict) else v:>7}  {v if isinstance(v, dict) else ''}")
    print("\nrequests by kind:", json.dumps(s["by_kind"]))
    print("budgets:", json.dumps(r["budgets"]["tiers"]))
    print("rss:", json.dumps(r["rss"]))
    if "rss_vllm_alone" in r:
        print("rss, same trace on vLLM alone:", json.dumps(r["rss_vllm_alone"]))
    print("replay:", json.dumps({k: v for k, v in r["replay"].items() if k != "examples"}))
    for name, c in r["checks"].items():
        print(f"check {name:<22} {'PASS' if c['pass'] else 'FAIL'}  {c['detail']}")


def checks(r: dict, exact: bool, rss_slope: float, rss_margin: float = 128.0) -> dict:
    s, b, rss, rp = r["load"], r["budgets"], r["rss"], r["replay"]
    over = {t: x["over_samples"] for t, x in b["tiers"].items() if x["over_samples"]}
    late = rss.get("slope_halves_mib_per_min", [None, float("inf")])[1]
    out = {"no_server_errors": {"pass": s["http_5xx"] == 0 and s["errors"] == 0 and not r["log_errors"],
                                "detail": f"5xx {s['http_5xx']}, transport {s['errors']}, "
                                          f"log {len(r['log_errors'])}"},
           "budgets_respected": {"pass": not over and b["samples"] > 0,
                                 "detail": f"{b['samples']} samples, over: {over or 'none'}"},
           "rss_flat": {"pass": late <= rss_slope,
                        "detail": f"late slope {late:.1f} MiB/min (limit {rss_slope}); growth after warm-up "
                                  f"{rss.get('growth_mib', float('nan')):.1f} MiB"}}
    if "rss_vllm_alone" in r:
        mine, alone = rss.get("rss_mib_max", float("inf")), r["rss_vllm_alone"].get("rss_mib_max", 0.0)
        out["rss_within_vllm_alone"] = {"pass": mine <= alone + rss_margin,
                                        "detail": f"max {mine:.0f} MiB vs vLLM alone {alone:.0f} MiB "
                                                  f"(margin {rss_margin:.0f})"}
    if exact:
        out["identical_to_vllm"] = {"pass": rp["replayed"] > 0 and rp["identical"] == rp["replayed"],
                                    "detail": f"{rp['identical']}/{rp['replayed']} (near ties {rp['near_ties']}), "
                                              f"max logprob gap {rp['max_logprob_gap']:.2e}"}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    p.add_argument("--warmup", type=float, default=None, help="seconds before RSS is judged (default 25%%)")
    p.add_argument("--model-layers", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device-bytes", default="256KiB")
    p.add_argument("--host-bytes", default="512KiB")
    p.add_argument("--disk-bytes", default="2MiB")
    p.add_argument("--max-num-batched-tokens", type=int, default=1024)
    p.add_argument("--kv-blocks", type=int, default=1024,
                   help="vLLM KV pool in blocks (both servers): a pool of a few GiB is touched page by page "
                        "for minutes, which reads as RSS growth")
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--rss-slope", type=float, default=64.0,
                   help="MiB/min: the most the server tree's RSS may still grow over the last half after warm-up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fidelity", default="exact", choices=["exact", "accurate", "fast"],
                   help="kvreuse's policy.fidelity; under \"exact\" every answer must match vLLM alone's (within --tol, "
                        "near ties accepted), and so must every answer on a 1-layer float32 model whatever the fidelity")
    p.add_argument("--no-replay", action="store_true")
    p.add_argument("--rss-baseline", action="store_true",
                   help="also run the same trace against vLLM alone (for --baseline-duration) and check that the "
                        "kvreuse server's RSS stays within --rss-margin of vLLM alone's")
    p.add_argument("--baseline-duration", type=float, default=None, help="seconds (default: --duration)")
    p.add_argument("--rss-margin", type=float, default=128.0, help="MiB")
    p.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment of both servers (e.g. MALLOC_ARENA_MAX=2 to tell allocator growth from a leak)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    root = Path(a.workdir or tempfile.mkdtemp(prefix="kvreuse-load-"))
    root.mkdir(parents=True, exist_ok=True)
    model = build_model(root / "models", a.model_layers, a.dtype)
    disk = tempfile.mkdtemp(prefix="disk-", dir=root)
    cfg = {"device_bytes": a.device_bytes, "host_bytes": a.host_bytes, "disk_path": disk,
           "disk_bytes": a.disk_bytes, "cost": {"learn": False, "step_overhead_s": 0.0},
           "policy": {"fidelity": a.fidelity}}
    extra = ["--max-num-seqs", str(max(a.clients, 8)), "--max-num-batched-tokens", str(a.max_num_batched_tokens),
             "--num-gpu-blocks-override", str(a.kv_blocks)]
    trace = Trace(seed=a.seed)
    warmup = a.duration * 0.25 if a.warmup is None else a.warmup
    r: dict = {"args": vars(a), "kvreuse_config": cfg, "model": str(model)}
    env = dict(kv.split("=", 1) for kv in a.server_env)
    with serve("kvreuse", model, log_dir=str(root), env=env, dtype=a.dtype, kvreuse_config=cfg, extra=extra) as srv:
        r["server_command"] = srv.command()
        name = httpx.get(srv.url + "/v1/models").json()["data"][0]["id"]
        before = settle(srv.url)
        sampler = Sampler(srv.url, srv.proc.pid)
        sampler.start()
        t0 = time.time()
        outs = drive(srv.url, name, trace, a.clients, a.duration)
        elapsed = time.time() - t0
        time.sleep(2)  # the last steps' gauges reach /metrics
        sampler.stop()
        r["store_events"] = store_events(delta(settle(srv.url), before))
        r["log_errors"] = log_errors(srv.log)[:20]
        r["server_log"] = srv.log
    r["load"] = summarize(outs, elapsed)
    r["budgets"] = sampler.budget_report()
    r["rss"] = sampler.rss_report(warmup)
    r["replay"] = {"replayed": 0, "identical": 0, "max_logprob_gap": 0.0, "skipped": True}
    if not a.no_replay:
        with serve("prefix", model, log_dir=str(root), env=env, dtype=a.dtype, extra=extra) as off:
            if a.rss_baseline:  # the same trace on vLLM alone: how much of the RSS curve is vLLM's own
                base = Sampler(off.url, off.proc.pid)
                base.start()
                dur = a.duration if a.baseline_duration is None else a.baseline_duration
                drive(off.url, name, trace, a.clients, dur)
                base.stop()
                r["rss_vllm_alone"] = base.rss_report(min(warmup, dur / 2))
            r["replay_server_command"] = off.command()
            try:
                r["replay"] = compare(off.url, outs, a.tol)
            except httpx.TransportError as e:  # the reference server went away: say why, replay on a fresh one
                print(f"vLLM alone failed during the replay ({e!r}; process "
                      f"{'exited ' + str(off.proc.poll()) if off.proc.poll() is not None else 'alive'}); "
                      f"its log ends:\n{log_tail(off.log)}", flush=True)
                r["replay_restarts"] = 1
        if r.get("replay_restarts"):
            with serve("prefix", model, log_dir=str(root), env=env, dtype=a.dtype, extra=extra) as off:
                r["replay"] = compare(off.url, outs, a.tol)
    for ex in r["replay"].get("examples", ()):  # what the server logged about each differing request
        ex["server_log_lines"] = log_lines_of(r.get("server_log"), ex.get("response_id"))
    # what the configuration promises: vLLM alone's answers under "exact"; on one float32 layer a chunk's KV
    # does not depend on its context, so every placement must reproduce them too
    exact = not a.no_replay and (a.fidelity == "exact" or (a.model_layers == 1 and a.dtype == "float32"))
    r["checks"] = checks(r, exact, a.rss_slope, a.rss_margin)
    print_report(r)
    write_json(a.json, r)
    return 0 if all(c["pass"] for c in r["checks"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
