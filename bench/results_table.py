"""Build the results tables of README.md and docs/benchmarks.md from the files in bench/results/.

    python bench/results_table.py            # rewrite both tables between their markers
    python bench/results_table.py --check    # exit 1 when a document's table differs from the files
    python bench/results_table.py --print    # print the tables, change nothing

Each table sits between `<!-- NAME:begin -->` and `<!-- NAME:end -->`: `results` in README.md (the
serving workloads: placed share, TTFT ratio, agreement of answers with vLLM alone), `results:other`
in docs/benchmarks.md (the load test, step times, the quality harness).

bench/results/ holds one current file per benchmark and host: `<bench>.json` for the 2-core x86 VM
with AMX, `<bench>_<host>.json` for another host (`HOSTS`).  Every row names the model, the host and
the command, read from the file where it records them (`model`, `host`, `command`) and otherwise
derived from its own fields: the model from its checkpoint name, the command from the script and the
`args` it recorded, the host from the file name (marked †: the file records no CPU model).

`<bench>_smollm2[_<host>].json` (rag_bench.py / noreuse_bench.py `--model smollm2`: vLLM's own benchmark
client on the real model) go to docs/benchmarks.md's `client` table, with the share of outputs identical to
vLLM alone's beside the TTFT ratios.

`fidelity*.json` (bench/fidelity_bench.py: answers on a real model against vLLM alone) gives one row
per workload and arm; `fidelity_rows` reads `{"workloads": {name: {"arms": {arm: {...}}}}}` or
`{"rows": [{"workload", "arm", ...}]}` with `agreement` (or `same` of `n`), `accuracy`,
`reference_accuracy`, `placed_share` and `ttft_ratio`.

`fidelity_config*.json` (fidelity_bench.py `--vllm-args`: every arm on other vLLM server arguments) goes to
docs/benchmarks.md's `fidelity:configs` table.

`repair_frontier*.json` (bench/repair_frontier.py: kvreuse's planner replayed on the real model, no server)
goes to docs/benchmarks.md's `repair:replay` table.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

# host tag (the file name's suffix) -> the host, for files that do not record their CPU
HOSTS = {"": "2-core x86 VM, AMX", "epyc": "2-core AMD EPYC VM, no AMX"}
SCRIPTS = {"raw_agent": "raw_agent_bench.py", "rag": "rag_bench.py", "caption": "caption_bench.py",
           "noreuse": "noreuse_bench.py", "step": "step_bench.py", "ttft": "ttft_bench.py",
           "load_test": "load_test.py", "quality": "quality_bench.py", "fidelity": "fidelity_bench.py"}
# recorded args that are paths or switches of this one run, not of what was measured
_NOT_ARGS = {"out", "json", "workdir", "model"}
_ARCH = {"llama": "Llama", "qwen2": "Qwen2", "qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL"}
NO_AGREEMENT = "not measured (random weights)"


@dataclass
class Row:
    workload: str
    model: str
    host: str
    command: str
    placed: str = "—"
    ttft: str = "—"
    agreement: str = "—"
    accuracy: str = "—"
    result: str = ""  # the other table's one summary cell


# ------------------------------------------------------------------ fields
def pct(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{100 * x:.{digits}f}%"


def ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def model_label(name: str | None) -> str:
    """A tiny checkpoint's name (`kvreuse.models`: `llama-l8-h512-...-bfloat16-s0`) as words; others as given."""
    if not name:
        return "not recorded"
    base = Path(str(name)).name
    m = re.match(r"^(qwen2_5_vl|qwen2_vl|qwen2|llama)-l(\d+)-h(\d+)-.*?-(bfloat16|float32)-s\d+", base)
    if m is None:
        return base
    dtype = {"bfloat16": "bf16", "float32": "fp32"}[m.group(4)]
    layers = f"{m.group(2)} layer" + ("" if m.group(2) == "1" else "s")
    return f"tiny {_ARCH[m.group(1)]}, {layers}, {dtype}, random weights"


def is_random(name: str | None) -> bool:
    return model_label(name).endswith("random weights")


def split_name(path: Path) -> tuple[str, str]:
    """(bench, host tag) of a result file: `rag_epyc.json` -> ("rag", "epyc")."""
    stem = path.stem
    for tag in HOSTS:
        if tag and stem.endswith("_" + tag):
            return stem[: -len(tag) - 1], tag
    return stem, ""


def host_of(path: Path, data: dict[str, Any]) -> str:
    """The file's own `host` where it names the machine; else from the file name, marked †."""
    h = data.get("host")
    if isinstance(h, str) and h and not h.startswith("CPU ("):
        return h
    return HOSTS[split_name(path)[1]] + " †"


def claims_of(d: dict[str, Any]) -> dict[str, int]:
    """Chunks kvreuse placed, by policy, summed over every request of the kvreuse arm the file records."""
    out: dict[str, int] = {}

    def walk(o: Any) -> None:
        if isinstance(o, dict):
            for k, v in o.items():
                if k == "claims_by_policy" and isinstance(v, dict):
                    for p, n in v.items():
                        out[p] = out.get(p, 0) + int(n)
                else:
                    walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)

    walk((d.get("runs") or {}).get("kvreuse"))
    return out


def agreement_cell(random_weights: bool, claims: dict[str, int], fidelity: str | None) -> str:
    """The agreement cell of a speed-only result: answers not compared, and how much of what it placed was
    approximate.  `fidelity`: the level the file records (None: read from the claims, marked §)."""
    base = NO_AGREEMENT if random_weights else "not measured"
    total = sum(claims.values())
    if not total:
        return base
    approx = total - claims.get("exact", 0)
    level = f"`{fidelity}`" if fidelity else ("`fast` §" if approx else "`exact` §")
    return f"{base}; {pct(approx / total, 0)} of placed chunks approximate ({level})"


def agreement_of(d: dict[str, Any]) -> str:
    cfg = (d.get("args") or {}).get("kvreuse_config")
    cfg = json.loads(cfg) if isinstance(cfg, str) else cfg or {}
    return agreement_cell(is_random(d.get("model")), claims_of(d), (cfg.get("policy") or {}).get("fidelity"))


def _quote(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v) if isinstance(v, (dict, list)) else str(v)
    if s and re.fullmatch(r"[\w@%+=:,./-]+", s):
        return s
    if any(not c.isprintable() for c in s):  # bash ANSI-C quoting, e.g. $'\n\n'
        return "$'" + s.encode("unicode_escape").decode().replace("'", "\\'") + "'"
    return "'" + s.replace("'", "'\"'\"'") + "'"


def command_of(script: str, data: dict[str, Any]) -> str:
    """The file's own `command`, else `python bench/SCRIPT` with the `args` the file recorded."""
    if isinstance(data.get("command"), str):
        cmd = data["command"]
        return cmd if cmd.startswith("python") else f"python {cmd}"
    parts = [f"python bench/{script}"]
    for k, v in (data.get("args") or {}).items():
        if k in _NOT_ARGS or v is None or v is False or v == "" or v == []:
            continue
        flag = "--" + k.replace("_", "-")
        parts.append(flag if v is True else f"{flag} {_quote(v)}")
    return " ".join(parts)


# ------------------------------------------------------------------ readers, one per benchmark
def agent_row(workload: str) -> Callable[[Path, dict], list[Row]]:
    def read(path: Path, d: dict) -> list[Row]:
        s = d["summary"]
        ttft = (f"{ratio(s['median_ttft_ratio_from_turn2'])} median, "
                f"{ratio(s['from_turn2']['ratio']['mean_ms'])} mean; turn 1: {ratio(s['turn1']['ratio']['mean_ms'])}")
        return [Row(workload, model_label(d.get("model")), host_of(path, d), command_of(SCRIPTS[d["bench"]], d),
                    placed=pct(s["placed_share_from_turn2"]) + " of turns 2+", ttft=ttft,
                    agreement=agreement_of(d))]
    return read


def rag_row(path: Path, d: dict) -> list[Row]:
    s = d["summary"]
    joiner = d.get("args", {}).get("joiner", "\n\n")
    workload = "RAG, passages joined by " + ("blank lines" if joiner == "\n\n" else repr(joiner))
    ttft = (f"{ratio(s['mean_ttft_ratio'])} mean, {ratio(s['p99_ttft_ratio'])} p99; "
            f"throughput {ratio(s['throughput_ratio'])}×")
    return [Row(workload, model_label(d.get("model")), host_of(path, d), command_of(SCRIPTS["rag"], d),
                placed=pct(s["placed_share"]), ttft=ttft, agreement=agreement_of(d))]


def noreuse_row(path: Path, d: dict) -> list[Row]:
    s = d["summary"]
    each = s.get("paired_each", {}).get("mean_ttft_ratio_each") or []
    spread = f" (repeats {min(each):.2f}–{max(each):.2f})" if each else ""
    ttft = (f"{ratio(s['mean_ttft_ratio'])} mean{spread}, {ratio(s['p99_ttft_ratio'])} p99; "
            f"throughput {ratio(s['throughput_ratio'])}×")
    return [Row("nothing reusable (kvreuse's cost)", model_label(d.get("model")), host_of(path, d),
                command_of(SCRIPTS["noreuse"], d), placed=pct(s.get("placed_share")), ttft=ttft,
                agreement=agreement_of(d))]


def ttft_text_row(path: Path, text: str) -> list[Row]:
    """`ttft_bench.py`'s printed table (a text file): the header names model and trace, the last line the ratio."""
    head = text.splitlines()[0]
    m = re.search(r"model: (\d+) layers, hidden (\d+), (\w+); trace: (\d+) turns, window (\d+) x (\d+) words; "
                  r"median of (\d+) replays", head)
    r = re.search(r"median ratio kvreuse / prefix-cache from turn 2: ([0-9.]+)", text)
    rows = re.findall(r"^\s+(\d+) \|.*\|\s+(\d+)\s+(\d+)\s+(\d+) \|", text, re.M)
    if m is None or r is None:
        raise ValueError(f"{path}: not ttft_bench.py's output")
    layers, hidden, dtype, turns, _window, words, reps = m.groups()
    placed = "—"
    later = [(int(k), int(p)) for t, k, p, _ in rows if int(t) >= 2]
    if later:  # prefill tokens computed, kvreuse vs vLLM's prefix cache
        placed = pct(1 - sum(k for k, _ in later) / sum(p for _, p in later)) + " of turns 2+"
    cmd = (f"python bench/ttft_bench.py --layers {layers} --hidden {hidden} --turns {turns} --repeats {reps} "
           f"--frame-words {words} --dtype {dtype}")
    model = f"tiny Llama, {layers} layers, {'bf16' if dtype == 'bfloat16' else dtype}, random weights"
    claims = re.search(r"^claims by policy\s+(.*)$", text, re.M)
    counts = {p: int(n) for p, n in re.findall(r"(\w+) (\d+)", claims.group(1))} if claims else {}
    return [Row("chat-message agent (one server, opted-out arms)", model, HOSTS[""] + " †", cmd + " ‡",
                placed=placed, ttft=f"{ratio(float(r.group(1)))} median; turns 2+",
                agreement=agreement_cell(True, counts, None))]


def _get(d: dict, *names: str) -> Any:
    for n in names:
        if d.get(n) is not None:
            return d[n]
    return None


def fidelity_rows(path: Path, d: dict) -> list[Row]:
    """Rows of a fidelity result: one per workload and arm (see the module docstring for the shape)."""
    items: list[tuple[str, str, dict]] = []
    if isinstance(d.get("rows"), list):
        items = [(r.get("workload", "?"), r.get("arm", "?"), r) for r in d["rows"]]
    else:
        wl = d.get("workloads") or {}
        wl = {w.get("name", str(i)): w for i, w in enumerate(wl)} if isinstance(wl, list) else wl
        for name, w in wl.items():
            arms = w.get("arms", {})
            arms = {a.get("arm", str(i)): a for i, a in enumerate(arms)} if isinstance(arms, list) else arms
            items += [(w.get("label", name), arm, a) for arm, a in arms.items()]
    model = d.get("model") or d.get("args", {}).get("model")
    out = []
    for workload, arm, a in items:
        same, n = _get(a, "same", "same_answers"), _get(a, "n", "requests")
        agree = _get(a, "agreement", "same_answer_share", "identical_share")
        if agree is None and isinstance(same, (int, float)) and n:
            agree = same / n
        agreement = pct(agree, 0) + (f" ({int(same)}/{int(n)})" if isinstance(same, (int, float)) and n else "")
        acc, ref = _get(a, "accuracy", "gold_accuracy"), _get(a, "reference_accuracy", "vllm_accuracy")
        accuracy = pct(acc, 0) + (f" (vLLM alone {pct(ref, 0)})" if ref is not None else "")
        out.append(Row(f"{workload}: {arm}", model_label(model), host_of(path, d), command_of(SCRIPTS["fidelity"], d),
                       placed=pct(_get(a, "placed_share", "placed")),
                       ttft=ratio(_get(a, "ttft_ratio", "mean_ttft_ratio")), agreement=agreement, accuracy=accuracy))
    return out


def load_test_row(path: Path, d: dict) -> list[Row]:
    a, checks, rep = d["args"], d.get("checks", {}), d.get("replay", {})
    passed = sum(1 for c in checks.values() if c.get("pass"))
    load = d.get("load", {})
    ev, kinds = d.get("store_events", {}), load.get("by_kind", {})
    cut = {k: sum(v.get(k, 0) for v in kinds.values()) for k in ("cancelled", "disconnected")}
    claims = ", ".join(f"{k} {n}" for k, n in sorted((ev.get("claims") or {}).items()))
    policy = ", ".join(x for x in (f"{a['fidelity']} fidelity" if a.get("fidelity") else "",
                                   f"claims: {claims}" if claims else "") if x)
    parts = [f"{a['clients']} clients, {a['duration']:.0f} s: {load.get('requests')} requests, "
             f"{passed}/{len(checks)} checks pass ({', '.join(checks)})",
             f"answers identical to vLLM alone {rep.get('identical')}/{rep.get('replayed')}",
             "with one layer a chunk's KV does not depend on its context" if a.get("model_layers") == 1 else "",
             policy,
             f"{ev.get('load_failures', 0)} failed loads recomputed, {cut['cancelled']} requests cancelled, "
             f"{cut['disconnected']} disconnected mid-stream"]
    res = "; ".join(x for x in parts if x)
    host = host_of(path, d) if split_name(path)[1] else "not recorded"  # load_test.json: its host was not kept
    return [Row("load test (mixed trace, tiny budgets)", model_label(d.get("model")), host,
                command_of(SCRIPTS["load_test"], d), result=res)]


def step_row(path: Path, d: dict) -> list[Row]:
    s = d["summary"]
    name = {"off": "vLLM alone", "kvreuse": "kvreuse"}
    arms = [(name.get(k, f"kvreuse `{k}`"), v) for k, v in s.items()]
    res = ("prefill " + ", ".join(f"{n} {v['prefill_ms']:.1f}" for n, v in arms) + " ms; decode "
           + ", ".join(f"{n} {v['decode_ms']:.2f}" for n, v in arms) + " ms")
    model = model_label(d.get("args", {}).get("model"))
    if not is_random(d.get("args", {}).get("model")):
        model = model.removesuffix("-float32") + ", bf16"  # the checkpoint's name; step_bench.py serves bfloat16
    return [Row("step times, one engine in-process", model, host_of(path, d), command_of(SCRIPTS["step"], d), result=res)]


def quality_row(path: Path, summary: dict, meta: dict) -> list[Row]:
    mh = {k: v["multi_hop"] for k, v in summary.items()}
    res = ("3-hop accuracy: full prefill " + pct(mh["full"], 0) + ", blind reuse " + pct(mh["blind"], 0)
           + ", base + default patch " + pct(mh["patch_default"], 0)
           + f" (patch {pct(summary['patch_default']['patch_bytes_frac'])} of the chunk's KV), survival "
           + pct(mh["survival"], 0) + ", reorder " + pct(mh["reorder"], 0))
    model = f"{Path(meta['model']).name} ({meta['num_layers']} layers, hand-built and trained)"
    cmd = (f"python bench/quality_bench.py --out bench/results/quality --examples {meta['examples']} "
           f"--reorder-examples {meta['reorder_examples']}")
    return [Row("quality harness, reference encoder", model, "not recorded", cmd + " ‡", result=res)]


READERS: dict[str, Callable[[Path, dict], list[Row]]] = {
    "raw_agent": agent_row("raw-text sliding-window agent"),
    "caption": agent_row("captioned screenshots (vision-language)"),
    "rag": rag_row, "noreuse": noreuse_row}
ORDER = ["fidelity", "raw_agent", "rag", "caption", "ttft", "noreuse"]


def main_rows(results: Path = RESULTS) -> list[Row]:
    rows: list[tuple[int, str, Row]] = []
    for path in sorted(results.glob("*.json")) + sorted(results.glob("*.txt")):
        bench, tag = split_name(path)
        if path.suffix == ".txt":
            if bench.startswith("ttft"):
                rows += [(ORDER.index("ttft"), tag, r) for r in ttft_text_row(path, path.read_text())]
            continue
        if bench.startswith("fidelity"):
            continue  # fidelity_table / frontier_table
        if bench in READERS:
            rows += [(ORDER.index(bench), tag, r) for r in READERS[bench](path, json.loads(path.read_text()))]
    return [r for _, _, r in sorted(rows, key=lambda x: (x[0], x[1]))]


def other_rows(results: Path = RESULTS) -> list[Row]:
    rows: list[Row] = []
    for path in sorted(results.glob("load_test*.json")):
        rows += load_test_row(path, json.loads(path.read_text()))
    for path in sorted(results.glob("step*.json")):
        rows += step_row(path, json.loads(path.read_text()))
    q = results / "quality"
    if (q / "summary.json").exists() and (q / "details.json").exists():
        meta = json.loads((q / "details.json").read_text())["_meta"]
        rows += quality_row(q, json.loads((q / "summary.json").read_text()), meta)
    return rows


# ------------------------------------------------------------------ tables
def _cell(s: str) -> str:
    return s.replace("|", "\\|")


def _commands(rows: list[Row]) -> tuple[dict[str, int], list[str]]:
    nums: dict[str, int] = {}
    for r in rows:
        nums.setdefault(r.command, len(nums) + 1)
    return nums, [f"{n}. `{c.removesuffix(' ‡')}`" + (" ‡" if c.endswith(" ‡") else "") for c, n in nums.items()]


def _notes(rows: list[Row]) -> list[str]:
    out = []
    if any(r.host.endswith("†") for r in rows):
        out.append("† Host named by the result file's name (`_epyc`; none: the x86 VM); the file itself records "
                   "at most its CPU count.")
    if any("§" in r.agreement for r in rows):
        out.append("§ Fidelity read from the claims by policy the file records (it records no `policy.fidelity`): "
                   "approximate placements served unrepaired are what `fast` serves; the default, `exact`, "
                   "places only exact KV.")
    if any(r.command.endswith("‡") for r in rows):
        out.append("‡ Command derived from the file's own fields (it records no arguments).")
    return out


def main_table(results: Path = RESULTS) -> str:
    rows = main_rows(results)
    nums, cmds = _commands(rows)
    lines = ["| workload | model | host | placed | TTFT, kvreuse / vLLM alone | same answers as vLLM alone | "
             "accuracy | command |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| " + " | ".join(_cell(x) for x in (r.workload, r.model, r.host, r.placed, r.ttft, r.agreement,
                                                         r.accuracy, f"[{nums[r.command]}]")) + " |")
    return "\n".join(lines + [""] + cmds + [""] + "\n\n".join(_notes(rows)).splitlines())


def other_table(results: Path = RESULTS) -> str:
    rows = other_rows(results)
    nums, cmds = _commands(rows)
    lines = ["| benchmark | model | host | result | command |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append("| " + " | ".join(_cell(x) for x in (r.workload, r.model, r.host, r.result,
                                                         f"[{nums[r.command]}]")) + " |")
    return "\n".join(lines + [""] + cmds + [""] + "\n\n".join(_notes(rows)).splitlines())


def _fid(row: dict) -> tuple[str, str, str, str]:
    """(same answers, accuracy, placed, TTFT mean / p99) of one fidelity row."""
    return (pct(row.get("same_answer"), 0), pct(row.get("accuracy"), 0), pct(row.get("placed_share"), 0),
            f"{row.get('ttft_ratio_mean', float('nan')):.2f} / {row.get('ttft_ratio_p99', float('nan')):.2f}")


def _fidelity_files(results: Path, kind: str) -> list[Path]:
    """`kind` "levels" (fidelity_<host>.json), "frontier" (fidelity_frontier*) or "configs" (fidelity_config*)."""
    def kind_of(p: Path) -> str:
        return "frontier" if "frontier" in p.name else "configs" if p.name.startswith("fidelity_config") else "levels"
    return [p for p in sorted(results.glob("fidelity*.json")) if kind_of(p) == kind]


def fidelity_table(results: Path = RESULTS) -> str:
    """Per workload: vLLM alone's accuracy, the noise floor, and each fidelity level's answers and speed."""
    out = []
    for path in _fidelity_files(results, "levels"):
        d = json.loads(path.read_text())
        rows = {(r["workload"], r["arm"]): r for r in d["rows"]}
        arms = [a for a in ("kvreuse-exact", "kvreuse-accurate", "kvreuse-fast") if any(k[1] == a for k in rows)]
        out += [f"SmolLM2-135M-Instruct in {d.get('dtype')}, {d.get('requests')} requests a workload, one at a "
                f"time, greedy; host: {host_of(path, d)}; `{d.get('command')}`. Each kvreuse cell: same answers as "
                "vLLM alone · accuracy · prompt placed · TTFT vs vLLM alone, mean / p99.", "",
                "| workload | vLLM alone: accuracy | noise floor (vLLM alone, prefix caching off): same answers · TTFT | "
                + " | ".join(f"`{a.removeprefix('kvreuse-')}`" for a in arms) + " |",
                "|---|---|---|" + "---|" * len(arms)]
        for w in d.get("workloads") or sorted({k[0] for k in rows}):
            ref, nopc = rows.get((w, "vllm"), {}), rows.get((w, "vllm-nopc"), {})
            cells = [" · ".join(_fid(rows[(w, a)])) if (w, a) in rows else "—" for a in arms]
            floor = (f"{pct(nopc.get('same_answer'), 0)} · {nopc.get('ttft_ratio_mean', float('nan')):.2f} / "
                     f"{nopc.get('ttft_ratio_p99', float('nan')):.2f}")
            out.append(f"| {w} | {pct(ref.get('accuracy'), 0)} | {floor} | "
                       + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out) if out else "(no fidelity results)"


def frontier_table(results: Path = RESULTS) -> str:
    """The repairs tried for `accurate`: each arm's answers, accuracy, placed share and TTFT per workload."""
    out = []
    for path in _fidelity_files(results, "frontier"):
        d = json.loads(path.read_text())
        out += [f"host: {host_of(path, d)}; `{d.get('command')}`", "",
                "| workload | arm (config) | same answers | accuracy (vLLM alone) | placed | TTFT mean / p99 |",
                "|---|---|---|---|---|---|"]
        cfgs = {name: (a.get("kvreuse_config") if isinstance(a, dict) else None)
                for name, a in (d.get("arms") or {}).items()} if isinstance(d.get("arms"), dict) else {}
        for r in d["rows"]:
            if r["arm"] == "vllm":
                continue
            same, acc, placed, ttft = _fid(r)
            cfg = cfgs.get(r["arm"])
            arm = r["arm"] + (f" `{json.dumps(cfg.get('policy', cfg))}`" if cfg else "")
            out.append(f"| {r['workload']} | {_cell(arm)} | {same} | {acc} ({pct(r.get('accuracy_ref'), 0)}) | "
                       f"{placed} | {ttft} |")
        out.append("")
    return "\n".join(out) if out else "(no frontier results)"


def configs_table(results: Path = RESULTS) -> str:
    """fidelity_config*.json: kvreuse against vLLM alone on other vLLM server arguments (`--vllm-args`)."""
    out = ["| vLLM arguments (every arm) | workload | arm | same answers | accuracy (vLLM alone) | noise floor: same "
           "answers | placed | TTFT mean / p99 | file |", "|---|---|---|---|---|---|---|---|---|"]
    files = [(path, json.loads(path.read_text())) for path in _fidelity_files(results, "configs")]
    for path, d in files:
        rows = {(r["workload"], r["arm"]): r for r in d["rows"]}
        for r in d["rows"]:
            if r["arm"] in ("vllm", "vllm-nopc"):
                continue
            same, acc, placed, ttft = _fid(r)
            nopc = rows.get((r["workload"], "vllm-nopc"))
            out.append(f"| {_cell('`' + (d.get('vllm_args') or '') + '`')} | {r['workload']} | {r['arm']} | {same} | "
                       f"{acc} ({pct(r.get('accuracy_ref'), 0)}) | {pct(nopc.get('same_answer'), 0) if nopc else '—'} | "
                       f"{placed} | {ttft} | `{path.name}` |")
    if len(out) == 2:
        return "(no results on other server arguments)"
    head = sorted({f"SmolLM2-135M-Instruct in {d.get('dtype')}, {d.get('requests')} requests a workload, one at a time, "
                   f"greedy; host: {d.get('host')}." for _, d in files})
    cmds = sorted({d.get("command", "") for _, d in files})
    return "\n".join(head + [""] + out + [""] + [f"- `{c}`" for c in cmds]) + "\n"


def replay_table(results: Path = RESULTS) -> str:
    """bench/repair_frontier.py: each arm's answers, accuracy, placed share, steps and estimated TTFT per workload."""
    out = []
    for path in sorted(results.glob("repair_frontier*.json")):
        d = json.loads(path.read_text())
        out += [f"{model_label(d.get('model')).removesuffix('-float32')} in {d.get('dtype')}, {d.get('requests')} requests a workload, replayed "
                f"(no server); TTFT estimated at {d.get('step_ms')} ms a step and {d.get('token_ms')} ms a prefilled "
                f"token; host: {host_of(path, d)}; `{d.get('command')}`", "",
                "| workload | arm (config) | same answers as full prefill | accuracy (full prefill) | placed | steps | "
                "TTFT est. |", "|---|---|---|---|---|---|---|"]
        for r in d["rows"]:
            cfg = r.get("config") or {}
            arm = r["arm"] + (f" `{json.dumps(cfg)}`" if cfg else "")
            out.append(f"| {r['workload']} | {_cell(arm)} | {pct(r['same_answer'], 0)} | {pct(r['accuracy'], 0)} "
                       f"({pct(r['accuracy_ref'], 0)}) | {pct(r['placed_share'], 0)} | {r['steps_mean']:.2f} | "
                       f"{r['ttft_est_mean']:.2f} |")
        out.append("")
    return "\n".join(out) if out else "(no replay results)"


_CLIENT_WORKLOADS = {"words": "nothing reusable (random words)", "random": "nothing reusable (vLLM's `random` dataset)",
                     "prefix_repetition": "shared prefixes (vLLM's `prefix_repetition` dataset)"}


def client_table(results: Path = RESULTS) -> str:
    """vLLM's own benchmark client against the real model: TTFT ratios with the outputs' agreement beside them,
    and the noise floor (vLLM alone with its prefix cache off against vLLM alone)."""
    lines = ["| workload | dtype | placed | TTFT, kvreuse / vLLM alone: mean · median · p99 | throughput | "
             "outputs identical to vLLM alone's: kvreuse | noise floor | command |",
             "|---|---|---|---|---|---|---|---|"]
    rows = []
    for path in sorted(results.glob("*_smollm2*.json")):
        if path.name.startswith("step"):
            continue  # step_bench.py on the real model: the other table's step times
        d = json.loads(path.read_text())
        a, s = d.get("args") or {}, d["summary"]
        if d.get("bench") == "rag":
            workload = (f"RAG: {a.get('per_prompt')} of {a.get('passages')} passages, random order, joined by "
                        + ("blank lines" if a.get("joiner", "\n\n") == "\n\n" else repr(a.get("joiner"))))
        else:
            workload = _CLIENT_WORKLOADS.get(a.get("dataset"), str(a.get("dataset")))
        cfg = json.loads(a["kvreuse_config"]) if a.get("kvreuse_config") else {}
        if cfg:
            workload += f" (kvreuse `{json.dumps(cfg)}`)"

        def same(name: str) -> str:
            k, n = s.get(name + "_count", [None, None])
            return f"{pct(s.get(name), 0)} ({k}/{n})" if n else "—"
        cells = (workload, {"bfloat16": "bf16", "float32": "fp32"}.get(a.get("dtype"), str(a.get("dtype"))),
                 pct(s.get("placed_share")),
                 f"{ratio(s['mean_ttft_ratio'])} · {ratio(s['median_ttft_ratio'])} · {ratio(s['p99_ttft_ratio'])}",
                 f"{ratio(s['throughput_ratio'])}×", same("same_output"), same("noise_floor_same_output"))
        rows.append((cells, Row(workload, "", host_of(path, d), command_of(SCRIPTS[d["bench"]], d))))
    if not rows:
        return "(no results of vLLM's benchmark client on the real model)"
    nums, cmds = _commands([r for _, r in rows])
    hosts = sorted({r.host for _, r in rows})
    for cells, r in rows:
        lines.append("| " + " | ".join(_cell(x) for x in (*cells, f"[{nums[r.command]}]")) + " |")
    return "\n".join([f"SmolLM2-135M-Instruct, `/v1/completions`, one request at a time, greedy, EOS ignored, kvreuse "
                      f"at its default configuration unless the row says; host: {', '.join(hosts)}.", ""]
                     + lines + [""] + cmds)


DOCUMENTS = [("README.md", "fidelity", fidelity_table), ("docs/benchmarks.md", "client", client_table),
             ("docs/benchmarks.md", "results", main_table), ("docs/benchmarks.md", "results:other", other_table),
             ("docs/benchmarks.md", "fidelity:frontier", frontier_table),
             ("docs/benchmarks.md", "repair:replay", replay_table),
             ("docs/benchmarks.md", "fidelity:configs", configs_table)]


def replace_between(text: str, name: str, body: str) -> str:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        raise SystemExit(f"results_table: markers {begin} / {end} not found")
    return text[: i + len(begin)] + "\n" + body.rstrip("\n") + "\n" + text[j:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when a document's table differs from the files")
    ap.add_argument("--print", action="store_true", help="print the tables, change nothing")
    ap.add_argument("--root", default=str(ROOT), help="repository root (tests)")
    ns = ap.parse_args(argv)
    root = Path(ns.root)
    stale = []
    for doc, name, build in DOCUMENTS:
        body = build(root / "bench" / "results")
        if ns.print:
            print(f"== {doc} ({name})\n{body}\n")
            continue
        path = root / doc
        old = path.read_text()
        new = replace_between(old, name, body)
        if new == old:
            continue
        if ns.check:
            stale.append(doc)
        else:
            path.write_text(new)
            print(f"results_table: rewrote the table in {doc}")
    if stale:
        print("results_table: tables differ from bench/results/ in " + ", ".join(stale)
              + " (run python bench/results_table.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
