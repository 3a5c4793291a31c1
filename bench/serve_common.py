"""What the serving benchmarks share: their models, one server at a time, its metrics, the host record.

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

Beside it: bench/common_cli.py (the shared options and the result file), bench/common_table.py (the
text tables), bench/common_client.py (vLLM's benchmark client against each arm) and
bench/common_turns.py (multi-turn traces replayed turn by turn).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
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
from typing import Any, Callable, ContextManager, Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from kvreuse.cli import parse_kvreuse_metrics  # noqa: E402
from server.demo import free_port, stop, wait_healthy  # noqa: E402

ARMS = ("kvreuse", "prefix")
# with answers compared: vLLM alone with its prefix cache off, against vLLM alone (the noise floor)
NOISE_FLOOR = "nopc"
# vLLM counters read for both arms (summed over engine / model labels)
VLLM_COUNTERS = ("vllm:prompt_tokens_total", "vllm:prompt_tokens_cached_total", "vllm:prefix_cache_queries_total",
                 "vllm:prefix_cache_hits_total",
                 "vllm:external_prefix_cache_queries_total", "vllm:external_prefix_cache_hits_total")
# the speed benchmarks measure placement itself: every policy, unrepaired ("fast"; on these random-weight models
# nobody can see an answer change); bench/fidelity_bench.py measures each fidelity's answers on a real model
DEFAULT_KVREUSE_CONFIG = {"store": {"device_bytes": "1GiB"}, "policy": {"fidelity": "fast"}}


def bench_model_spec(num_layers: int = 8, hidden_size: int = 512, dtype: str = "bfloat16"):
    """The benches' tiny Llama: heads of 64, a quarter as many KV heads, a 4096-word vocabulary.  The
    defaults are the 8-layer bf16 one of `make demo` and the serving benches (prefill dominates TTFT on CPU)."""
    from kvreuse.models import TinySpec

    heads = hidden_size // 64
    return TinySpec(num_layers=num_layers, hidden_size=hidden_size, num_heads=heads, num_kv_heads=max(1, heads // 4),
                    head_dim=64, intermediate_size=4 * hidden_size, vocab_size=4096, dtype=dtype, init_std=0.02)


def bench_vl_spec(arch: str = "qwen2_vl", num_layers: int = 8, hidden_size: int = 512, pixels: int = 448,
                  vision_depth: int = 2, vision_dim: int = 128, dtype: str = "bfloat16"):
    """The benches' tiny Qwen2-VL: heads of 64, mrope sections (8, 12, 12), a 2048-word vocabulary and
    screenshots up to `pixels` square (448 -> 256 image tokens)."""
    from kvreuse.models.tiny_vl import TinyVLSpec

    heads = hidden_size // 64
    q = 32 // 8  # mrope sections of head_dim 64: (8, 12, 12)
    return TinyVLSpec(arch=arch, num_layers=num_layers, hidden_size=hidden_size, num_heads=heads,
                      num_kv_heads=max(1, heads // 4), intermediate_size=4 * hidden_size, vocab_size=2048,
                      mrope_section=(2 * q, 3 * q, 3 * q), vision_depth=vision_depth, vision_dim=vision_dim,
                      vision_heads=2, dtype=dtype, init_std=0.02, max_pixels=pixels * pixels)


def build_bench_model(spec) -> tuple[str, list[str]]:
    """(checkpoint directory, words of its vocabulary) of a tiny Llama or Qwen2-VL spec, built offline once."""
    from kvreuse.models.tiny_vl import TinyVLSpec

    if isinstance(spec, TinyVLSpec):
        from kvreuse.models.tiny_vl import build_tiny_vl_model, vl_words

        return str(build_tiny_vl_model(None, spec)), vl_words(spec.vocab_size)
    from kvreuse.models import build_tiny_model
    from kvreuse.models.tiny import tiny_words

    return str(build_tiny_model(None, spec)), tiny_words(spec.vocab_size)


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


def allocator_name() -> str:
    """`allocator()` by name: "tcmalloc_minimal", "tcmalloc" or "glibc"."""
    lib = allocator()
    return os.path.basename(lib).split(".so")[0][3:] if lib else "glibc"


def cpu_info() -> dict[str, Any]:
    """{"cpu": /proc/cpuinfo's model name, "cores": CPUs, "amx": whether the CPU flags name AMX}."""
    model, flags = None, set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model is None:
                model = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
    return {"cpu": model or platform.processor() or platform.machine() or "unknown CPU", "cores": os.cpu_count(),
            "amx": any(f.startswith("amx") for f in flags)}


def shell_quote(s: str) -> str:
    """`s` as bash takes it, on one line: bare when safe, $'...' with escapes when it holds a newline or tab."""
    if s and re.fullmatch(r"[\w@%+=:,./-]+", s):
        return s
    if any(not c.isprintable() for c in s):
        return "$'" + s.encode("unicode_escape").decode().replace("'", "\\'") + "'"
    return shlex.quote(s)


def command_line(argv: list[str] | None = None, drop: tuple[str, ...] = ("--out",)) -> str:
    """This process's command line as `python bench/SCRIPT ...` (the script relative to the repository), without
    the options in `drop` and their values (the output path: a result file sits where it belongs)."""
    argv = list(sys.argv if argv is None else argv)
    script = os.path.abspath(argv[0]) if argv and argv[0] else ""
    if script.startswith(ROOT + os.sep):
        script = os.path.relpath(script, ROOT)
    rest, skip = [], False
    for tok in argv[1:]:
        if skip:
            skip = False
        elif tok in drop:
            skip = True
        elif not any(tok.startswith(d + "=") for d in drop):
            rest.append(tok)
    return " ".join(["python", *(shell_quote(t) for t in [script, *rest] if t)])


def host_name(info: dict[str, Any] | None = None) -> str:
    """The host as a result file names it: CPU model, cores, AMX or not ("AMD EPYC, 2 cores, no AMX")."""
    info = info or cpu_info()
    return f"{info['cpu']}, {info['cores']} cores, {'AMX' if info['amx'] else 'no AMX'}"


def host_tag(info: dict[str, Any] | None = None) -> str:
    """The host's suffix in a result file's name (`bench/results_table.py`'s HOSTS): "" for the x86 VM with
    AMX, "epyc" for the AMD EPYC one, else the CPU model as a slug."""
    info = info or cpu_info()
    if "EPYC" in info["cpu"]:
        return "epyc"
    return "" if info["amx"] else re.sub(r"[^a-z0-9]+", "-", info["cpu"].lower()).strip("-")


def host_text() -> str:
    """`host_name` and the allocator both arms ran with, for the benches' printed headers."""
    return f"{host_name()}; malloc {allocator_name()}"


def host_record(argv: list[str] | None = None) -> dict[str, Any]:
    """What a result file records of where and how it ran: `host` (`host_name`), `host_detail` (the same as
    fields, plus the allocator both arms preload) and `command` (`command_line`)."""
    info = cpu_info()
    return {"host": host_name(info), "host_detail": {**info, "malloc": allocator_name()},
            "command": command_line(argv)}


def arm_order(rep: int, arms: tuple[str, ...] = ARMS) -> tuple[str, ...]:
    """Arms in the order repeat `rep` runs them: alternating, so neither always goes first."""
    return arms if rep % 2 == 0 else arms[::-1]


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
    if arm in ("prefix", NOISE_FLOOR):
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), *common,
                *(prefix_extra or []), *(["--no-enable-prefix-caching"] if arm == NOISE_FLOOR else [])]
    raise ValueError(f"unknown arm {arm!r}")


@contextlib.contextmanager
def serve(arm: str, model_dir: str | os.PathLike, *, log_dir: str | None = None, env: dict | None = None,
          port: int | None = None, **kw) -> Iterator[Server]:
    """Start one arm's server (on `port`, default a free one), wait until healthy, yield it, and always stop it;
    `kw` go to `server_argv`."""
    port = port or free_port()
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


@dataclass
class ArmRuns:
    """What `alternate_arms` measured: per arm one result per repeat, each arm's server command line, the
    seconds it took, and what `prepare` returned for each repeat."""

    runs: dict[str, list]
    commands: dict[str, str]
    elapsed_s: float
    prepared: list

    def fields(self) -> dict[str, Any]:
        """The result file's fields of these runs."""
        return {"runs": self.runs, "elapsed_s": self.elapsed_s, "server_commands": self.commands}


def alternate_arms(repeats: int, prepare: Callable[[int], Any], serve_arm: Callable[[str, int], ContextManager[Server]],
                   measure: Callable[[Server, int, Any], Any], arms: tuple[str, ...] = ARMS) -> ArmRuns:
    """Each repeat: `prepare(rep)` (its workload, the same for every arm), then per arm in `arm_order(rep)` a
    server from `serve_arm(arm, rep)` (a fresh `serve` as a rule) and `measure(server, rep, prepared)`."""
    runs: dict[str, list] = {arm: [] for arm in arms}
    commands: dict[str, str] = {}
    prepared = []
    t0 = time.time()
    for rep in range(repeats):
        prepared.append(prepare(rep))
        for arm in arm_order(rep, arms):
            with serve_arm(arm, rep) as srv:
                runs[arm].append(measure(srv, rep, prepared[-1]))
                commands[arm] = srv.command()
    return ArmRuns(runs, commands, time.time() - t0, prepared)


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


def median(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def write_json(path: str | os.PathLike | None, obj: dict) -> None:
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=1, default=str) + "\n")
    print(f"wrote {path}")
