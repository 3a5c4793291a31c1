"""What the serving benchmarks share: one server at a time, its metrics, vLLM's own benchmark client.

Every benchmark here compares two arms on the same checkpoint and vLLM arguments:
  * kvreuse — `python -m kvreuse.cli serve MODEL ...` (KVReuseConnector, segmented prefill, vLLM's
    prefix cache still on);
  * prefix  — `python -m vllm.entrypoints.openai.api_server --model MODEL ...`: stock vLLM with its
    prefix cache (on by default), no `--kv-transfer-config`.
The machine has few cores, so only one server runs at a time: each repeat starts a fresh server per
arm, in alternating order (`arm_order`), and the scripts report medians over repeats.

Counters come from the server's `/metrics` (`scrape` before and after, `delta`), so every figure is
what the server itself reports: kvreuse_* families through `kvreuse.cli.parse_kvreuse_metrics`, and
vLLM's prompt-token and prefix-cache counters for both arms.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kvreuse.cli import parse_kvreuse_metrics  # noqa: E402
from server.demo import free_port, stop, wait_healthy  # noqa: E402

ARMS = ("kvreuse", "prefix")
# vLLM counters read for both arms (summed over engine / model labels)
VLLM_COUNTERS = ("vllm:prompt_tokens_total", "vllm:prompt_tokens_cached_total", "vllm:prefix_cache_queries_total",
                 "vllm:prefix_cache_hits_total",
                 "vllm:external_prefix_cache_queries_total", "vllm:external_prefix_cache_hits_total")
# the speed benchmarks measure placement itself: every policy, unrepaired ("fast"; on these random-weight models
# nobody can see an answer change); bench/fidelity_bench.py measures each fidelity's answers on a real model
DEFAULT_KVREUSE_CONFIG = {"store": {"device_bytes": "1GiB"}, "policy": {"fidelity": "fast"}}


def bench_model_spec():
    """The 8-layer bf16 tiny Llama of `bench/ttft_bench.py` and `make demo` (prefill dominates TTFT on CPU)."""
    from kvreuse.models import TinySpec

    return TinySpec(num_layers=8, hidden_size=512, num_heads=8, num_kv_heads=2, head_dim=64, intermediate_size=2048,
                    vocab_size=4096, dtype="bfloat16", init_std=0.02)


def warm_seed(seed: int) -> int:
    """Seed of the warm-up content that goes with a measured run's `seed`: unrelated to every measured seed
    (not `-seed`: `random.Random(-s)` draws the same as `random.Random(s)`)."""
    return 10**9 + seed


# Both arms run with the memory allocator vLLM's CPU installation guide recommends: tcmalloc, preloaded.  With
# glibc's malloc a vLLM CPU worker's page faults vary several-fold from one server instance to the next
# (measured on this bench's nothing-reusable run, vLLM alone: 0.27M minor faults and mean TTFT 218 ms in one
# instance, 1.31M and 285 ms in the next; kvreuse alike), which swamps a few percent of difference between
# the arms; with tcmalloc, ~10k faults each time.  KVREUSE_BENCH_MALLOC=system runs glibc's malloc instead.
_TCMALLOC = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def allocator() -> str | None:
    """Path of the allocator both arms preload (tcmalloc where installed), or None: glibc's malloc."""
    if os.environ.get("KVREUSE_BENCH_MALLOC", "tcmalloc").strip().lower() in ("system", "glibc", "off", "none"):
        return None
    for d in _LIB_DIRS:
        for name in _TCMALLOC:
            path = os.path.join(d, name)
            if os.path.exists(path):
                return path
    return None


def allocator_env() -> dict[str, str]:
    """`LD_PRELOAD` for `allocator()` (kept in front of any preload already set); {} for glibc's malloc."""
    lib = allocator()
    if lib is None:
        return {}
    pre = os.environ.get("LD_PRELOAD", "")
    return {"LD_PRELOAD": pre if lib in pre.split(":") else ":".join(x for x in (lib, pre) if x)}


def host_label() -> str:
    """The host as the benches' headers name it: CPU cores and the allocator both arms ran with."""
    lib = allocator()
    return f"CPU ({os.cpu_count()} cores), malloc {os.path.basename(lib).split('.so')[0][3:] if lib else 'glibc'}"


def arm_order(rep: int) -> tuple[str, ...]:
    """Arms in the order repeat `rep` runs them: alternating, so neither always goes first."""
    return ARMS if rep % 2 == 0 else ARMS[::-1]


@dataclass
class Server:
    """A started server: its URL, process, log file and the argv it was started with."""

    arm: str
    url: str
    proc: subprocess.Popen
    log: str
    argv: list[str] = field(default_factory=list)

    def command(self) -> str:
        """The server's command line, as a shell would take it."""
        return shlex.join(["python", *self.argv[1:]])


def server_argv(arm: str, model_dir: str | os.PathLike, port: int, *, dtype: str = "bfloat16",
                max_model_len: int = 4096, kvreuse_config: dict | None = None,
                extra: list[str] | None = None, prefix_extra: list[str] | None = None) -> list[str]:
    """Command line of one arm; `extra` vLLM arguments go to both arms alike, `prefix_extra` to vLLM alone
    only (e.g. `--no-async-scheduling`, which `kvreuse serve` always sets, to tell its cost from kvreuse's)."""
    common = ["--port", str(port), "--host", "127.0.0.1", "--enforce-eager", "--gpu-memory-utilization", "0.4",
              "--max-model-len", str(max_model_len), "--dtype", dtype, "--seed", "0",
              "--enable-prompt-tokens-details", *(extra or [])]
    if arm == "kvreuse":
        cfg = DEFAULT_KVREUSE_CONFIG if kvreuse_config is None else kvreuse_config
        return [sys.executable, "-m", "kvreuse.cli", "serve", str(model_dir), "--kvreuse-config", json.dumps(cfg),
                *common]
    if arm == "prefix":
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), *common,
                *(prefix_extra or [])]
    raise ValueError(f"unknown arm {arm!r}")


@contextlib.contextmanager
def serve(arm: str, model_dir: str | os.PathLike, *, log_dir: str | None = None, env: dict | None = None,
          **kw) -> Iterator[Server]:
    """Start one arm's server, wait until healthy, yield it, and always stop it."""
    port = free_port()
    argv = server_argv(arm, model_dir, port, **kw)
    log_dir = log_dir or tempfile.mkdtemp(prefix="kvreuse-bench-")
    log = os.path.join(log_dir, f"{arm}-{port}.log")
    # vLLM's CPU thread binding reserves one more core for the engine whenever a KV connector is configured
    # (for NIXL), so on a 2-core host the kvreuse arm's worker got both cores (2 OMP threads) and vLLM alone one:
    # ~1.35x faster prefill with nothing reused when idle, far slower under contention.  One reserved core for both.
    full_env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
                "VLLM_CPU_NUM_OF_RESERVED_CPU": os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "1"),
                **allocator_env(), **(env or {})}
    print(f"[{time.strftime('%H:%M:%S')}] starting {arm} server (log {log})", flush=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, log)
        yield Server(arm, url, proc, log, argv)
    finally:
        stop(proc)


def scrape(url: str) -> dict[str, float]:
    """kvreuse_* samples (`kvreuse.cli.parse_kvreuse_metrics`) plus the `VLLM_COUNTERS`, from `url`/metrics."""
    text = urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=10).read().decode()
    out = parse_kvreuse_metrics(text)
    for line in text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in VLLM_COUNTERS:
            out[name] = out.get(name, 0.0) + float(line.rpartition(" ")[2])
    return out


def settle(url: str, pause: float = 0.5, tries: int = 10) -> dict[str, float]:
    """`scrape` once the counters stop moving (step stats reach /metrics shortly after a request ends)."""
    prev = scrape(url)
    for _ in range(tries):
        time.sleep(pause)
        cur = scrape(url)
        if cur == prev:
            return cur
        prev = cur
    return prev


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    """Per-sample difference (gauges included, so only read counters and histograms from it)."""
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def labelled(d: dict[str, float], family: str, label: str) -> dict[str, float]:
    """{label value: sample} of one family, e.g. claims by policy, segments by kind."""
    out = {}
    for k, v in d.items():
        m = re.fullmatch(re.escape(family) + r'\{' + re.escape(label) + r'="([^"]*)"\}', k)
        if m and v:
            out[m.group(1)] = out.get(m.group(1), 0.0) + v
    return {k: int(v) if float(v).is_integer() else v for k, v in sorted(out.items())}


def hist_quantile(d: dict[str, float], family: str, q: float) -> float | None:
    """Quantile `q` of a Prometheus histogram's observations (bucket counts in `d`), linearly
    interpolated inside its bucket as Prometheus' histogram_quantile does; None without observations."""
    buckets = sorted((float(m.group(1)), v) for k, v in d.items()
                     if (m := re.fullmatch(re.escape(family) + r'_bucket\{le="([^"]+)"\}', k)))
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lo_le, lo_n = 0.0, 0.0
    for le, n in buckets:
        if n >= rank:
            if le == float("inf"):
                return lo_le
            return lo_le + (le - lo_le) * ((rank - lo_n) / (n - lo_n) if n > lo_n else 1.0)
        lo_le, lo_n = le, n
    return buckets[-1][0]


def reuse_summary(d: dict[str, float]) -> dict:
    """kvreuse's side of a metrics delta: placed tokens, claims, segments, gap tokens, loads."""
    n_load = d.get("kvreuse_load_seconds_count", 0.0)
    p50 = hist_quantile(d, "kvreuse_load_seconds", 0.5)
    return {"reused_tokens": int(d.get("kvreuse_reused_tokens_total", 0)),
            "claims_by_policy": labelled(d, "kvreuse_claims_total", "policy"),
            "segments": labelled(d, "kvreuse_segments_total", "kind"),
            "gap_tokens": int(d.get("kvreuse_gap_tokens_total", 0)),
            "loads": int(n_load),
            "load_ms_mean": 1e3 * d.get("kvreuse_load_seconds_sum", 0.0) / n_load if n_load else None,
            "load_ms_p50": None if p50 is None else 1e3 * p50,
            "load_failures": int(d.get("kvreuse_load_failures_total", 0)),
            "captured_patches": int(d.get("kvreuse_captured_patches_total", 0)),
            "dropped_saves": int(d.get("kvreuse_dropped_saves_total", 0)),
            "saved_chunks": int(d.get("kvreuse_saved_chunks_total", 0)),
            "deferred_saves": int(d.get("kvreuse_deferred_saves_total", 0))}


def prompt_tokens(d: dict[str, float]) -> int:
    """Prompt tokens the server saw in a metrics delta."""
    return int(d.get("vllm:prompt_tokens_total", 0))


def prefix_cache_hits(d: dict[str, float]) -> int:
    """Prompt tokens served by vLLM's own prefix cache in a metrics delta."""
    return int(d.get("vllm:prefix_cache_hits_total", 0))


def vllm_bench_serve(url: str, model_dir: str | os.PathLike, args: list[str]) -> dict:
    """Run vLLM's own benchmark client (`vllm.benchmarks.serve`, what `vllm bench serve` runs) in this process
    against `url`; `args` are its CLI options (dataset, concurrency, ...).  Returns its result dict with the
    per-request lists (`ttfts`, `input_lens`, ...) kept."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    p = FlexibleArgumentParser()
    add_cli_args(p)
    ns = p.parse_args(["--base-url", url, "--model", str(model_dir), "--backend", "vllm",
                       "--endpoint", "/v1/completions", "--save-detailed", "--disable-tqdm",
                       "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
                       "--temperature", "0", *args])
    result = main(ns)
    if result.get("failed"):
        errs = [e for e in result.get("errors", []) if e]
        raise SystemExit(f"vllm.benchmarks.serve: {result['failed']} requests failed: {errs[:3]}")
    return result


CLIENT_FIGURES = ("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "request_throughput", "output_throughput",
                  "prompt_tokens", "placed_share", "prefix_cache_share", "load_ms_p50", "load_ms_mean", "gap_tokens")


def client_run(server: Server, model_dir: str, bench_args: list[str], warm: list[str]) -> dict:
    """Warm `server` up with `warm` prompts, then one `vllm_bench_serve` run: its TTFT and throughput figures
    plus what the server's /metrics counted meanwhile (placed share, prefix-cache share, `reuse_summary`)."""
    warm_up_completions(server.url, model_dir, warm)
    before = settle(server.url)
    res = vllm_bench_serve(server.url, model_dir, ["--num-warmups", "0", "--ready-check-timeout-sec", "0",
                                                   *bench_args])
    d = delta(settle(server.url), before)
    n_prompt = prompt_tokens(d)
    reuse = reuse_summary(d)
    return {"mean_ttft_ms": res["mean_ttft_ms"], "median_ttft_ms": res["median_ttft_ms"],
            "p99_ttft_ms": res["p99_ttft_ms"], "request_throughput": res["request_throughput"],
            "output_throughput": res["output_throughput"], "duration_s": res["duration"],
            "completed": res["completed"], "prompt_tokens": n_prompt,
            "placed_share": reuse["reused_tokens"] / n_prompt if n_prompt else None,
            "prefix_cache_share": prefix_cache_hits(d) / n_prompt if n_prompt else None,
            "ttfts_s": res["ttfts"], **reuse}


def client_medians(runs: dict[str, list[dict]]) -> tuple[dict, dict]:
    """Per arm, the median over repeats of each of `CLIENT_FIGURES`; and the kvreuse / prefix ratios."""
    m = {arm: {k: median(r[k] for r in runs[arm]) for k in CLIENT_FIGURES} for arm in ARMS}
    k, p = m["kvreuse"], m["prefix"]
    ratios = {"mean_ttft_ratio": ratio(k["mean_ttft_ms"], p["mean_ttft_ms"]),
              "median_ttft_ratio": ratio(k["median_ttft_ms"], p["median_ttft_ms"]),
              "p99_ttft_ratio": ratio(k["p99_ttft_ms"], p["p99_ttft_ms"]),
              "throughput_ratio": ratio(k["request_throughput"], p["request_throughput"]),
              "output_throughput_ratio": ratio(k["output_throughput"], p["output_throughput"])}
    return m, ratios


def paired_ratios(runs: dict[str, list[dict]]) -> dict:
    """Per figure, the median over repeats of kvreuse / vLLM alone *within* each repeat (the two arms of a
    repeat run back to back, so a slow spell of the host weighs on both)."""
    out = {}
    for name, fig in (("mean_ttft_ratio", "mean_ttft_ms"), ("median_ttft_ratio", "median_ttft_ms"),
                      ("p99_ttft_ratio", "p99_ttft_ms"), ("throughput_ratio", "request_throughput")):
        out[name] = median(ratio(k[fig], p[fig]) for k, p in zip(runs["kvreuse"], runs["prefix"]))
        out[name + "_each"] = [ratio(k[fig], p[fig]) for k, p in zip(runs["kvreuse"], runs["prefix"])]
    return out


def print_client_table(m: dict, ratios: dict, runs: dict[str, list[dict]]) -> None:
    """Both arms' medians, the ratio row, and kvreuse's counters of every repeat."""
    print(f"{'arm':>8} | {'TTFT ms mean':>12} {'median':>8} {'p99':>8} | {'req/s':>6} {'out tok/s':>9} | "
          f"{'placed':>6} {'prefix hit':>10} | {'load ms p50':>11} {'mean':>6}")
    for arm in ARMS:
        x = m[arm]
        print(f"{arm:>8} | {x['mean_ttft_ms']:>12.1f} {x['median_ttft_ms']:>8.1f} {x['p99_ttft_ms']:>8.1f} | "
              f"{x['request_throughput']:>6.2f} {x['output_throughput']:>9.1f} | {fmt(x['placed_share'], '.1%'):>6} "
              f"{fmt(x['prefix_cache_share'], '.1%'):>10} | {fmt(x['load_ms_p50'], '.1f'):>11} "
              f"{fmt(x['load_ms_mean'], '.1f'):>6}")
    print(f"{'ratio':>8} | {fmt(ratios['mean_ttft_ratio']):>12} {fmt(ratios['median_ttft_ratio']):>8} "
          f"{fmt(ratios['p99_ttft_ratio']):>8} | {fmt(ratios['throughput_ratio']):>6} "
          f"{fmt(ratios['output_throughput_ratio']):>9} |")
    for i, r in enumerate(runs["kvreuse"]):
        print(f"kvreuse repeat {i + 1}: claims by policy {r['claims_by_policy']}; segments {r['segments']}; "
              f"gap tokens {r['gap_tokens']}; loads {r['loads']} (failed {r['load_failures']}); patches captured "
              f"{r['captured_patches']}; chunks saved {r.get('saved_chunks')}, dropped {r['dropped_saves']}, deferred "
              f"{r.get('deferred_saves')}")


def warm_up_completions(url: str, model: str, prompts: list[str], max_tokens: int = 4) -> None:
    """Send `prompts` (content unrelated to the measured run) so one-time start-up costs are not measured."""
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="unused", timeout=600)
    for p in prompts:
        client.completions.create(model=model, prompt=p, max_tokens=max_tokens, temperature=0)


def stream_completion(client, model: str, prompt: str, max_tokens: int = 4) -> tuple[float, int, int]:
    """(seconds to first token, prompt tokens, cached tokens) of one streamed `/v1/completions` request."""
    t0 = time.perf_counter()
    first, usage = None, None
    for ev in client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                        stream=True, stream_options={"include_usage": True}):
        if first is None and ev.choices and ev.choices[0].text:
            first = time.perf_counter() - t0
        if ev.usage is not None:
            usage = ev.usage
    details = getattr(usage, "prompt_tokens_details", None)
    cached = (details.cached_tokens or 0) if details else 0
    return (first if first is not None else time.perf_counter() - t0), usage.prompt_tokens, cached


def median(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def turn_spread(runs: dict[str, list[list[dict]]], turns: range) -> dict:
    """TTFT over every (repeat, turn) of `turns`, per arm: mean, p50 and p99 in ms, and kvreuse / prefix of each
    (the per-turn medians hide a slow outlier; this is what a user of the trace sees)."""
    out: dict = {}
    for arm, reps in runs.items():
        xs = sorted(1e3 * r[t]["ttft_s"] for r in reps for t in turns if t < len(r))
        if xs:
            out[arm] = {"mean_ms": statistics.mean(xs), "p50_ms": statistics.median(xs),
                        "p99_ms": xs[min(len(xs) - 1, round(0.99 * (len(xs) - 1)))], "n": len(xs)}
    if "kvreuse" in out and "prefix" in out:
        out["ratio"] = {k: out["kvreuse"][k] / out["prefix"][k] for k in ("mean_ms", "p50_ms", "p99_ms")}
    return out


def print_spread(label: str, spread: dict) -> None:
    r = spread.get("ratio")
    if r:
        print(f"{label}: TTFT kvreuse / prefix mean {r['mean_ms']:.2f}, p50 {r['p50_ms']:.2f}, p99 {r['p99_ms']:.2f} "
              f"(kvreuse {spread['kvreuse']['mean_ms']:.1f} / {spread['kvreuse']['p99_ms']:.1f} ms mean / p99, "
              f"prefix {spread['prefix']['mean_ms']:.1f} / {spread['prefix']['p99_ms']:.1f}; "
              f"{spread['kvreuse']['n']} requests an arm)")


def fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def write_json(path: str | os.PathLike | None, obj: dict) -> None:
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=1, default=str) + "\n")
    print(f"wrote {path}")
