"""The documents against what they cite: the results tables regenerate from bench/results/, links resolve.

`bench/results_table.py --check` fails when README.md's or docs/benchmarks.md's table differs from the
result files (a file added, removed or re-measured without regenerating); the rest runs the script on
a copy with synthetic files.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from bench import results_table as rt

ROOT = Path(__file__).resolve().parents[2]


def test_tables_match_the_result_files():
    assert rt.main(["--check"]) == 0, "run python bench/results_table.py"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A repository root with the real result files and documents holding empty tables."""
    shutil.copytree(ROOT / "bench" / "results", tmp_path / "bench" / "results")
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("# r\n<!-- fidelity:begin -->\n<!-- fidelity:end -->\ntail\n")
    (tmp_path / "docs" / "benchmarks.md").write_text(
        "<!-- results:begin -->\n<!-- results:end -->\n<!-- results:other:begin -->\n<!-- results:other:end -->\n"
        "<!-- fidelity:frontier:begin -->\n<!-- fidelity:frontier:end -->\n<!-- client:begin -->\n<!-- client:end -->\n"
        "<!-- repair:replay:begin -->\n<!-- repair:replay:end -->\n"
        "<!-- fidelity:configs:begin -->\n<!-- fidelity:configs:end -->\n")
    return tmp_path


def test_check_fails_until_rewritten(tree: Path):
    assert rt.main(["--check", "--root", str(tree)]) == 1
    assert rt.main(["--root", str(tree)]) == 0
    assert rt.main(["--check", "--root", str(tree)]) == 0
    text = (tree / "docs" / "benchmarks.md").read_text()
    assert text.startswith("<!-- results:begin -->\n| workload |")


def test_every_row_names_model_host_and_command(tree: Path):
    rows = rt.main_rows(tree / "bench" / "results") + rt.other_rows(tree / "bench" / "results")
    assert rows
    for r in rows:
        assert r.model and r.host and r.command.startswith("python bench/"), r
    body = rt.main_table(tree / "bench" / "results")
    # a recorded joiner of two newlines is written as the shell would take it
    assert "--joiner $'\\n\\n'" in body
    assert not re.search(r"--out\b", body) and "/tmp/" not in body


def _fidelity_row(workload: str, arm: str, same: float, acc: float, placed: float, ttft: float) -> dict:
    return {"workload": workload, "arm": arm, "n": 40, "same_answer": same, "accuracy": acc, "accuracy_ref": 0.72,
            "placed_share": placed, "ttft_ratio_mean": ttft, "ttft_ratio_p99": ttft + 0.1}


def test_fidelity_table(tree: Path):
    res = tree / "bench" / "results"
    for p in res.glob("fidelity*.json"):
        p.unlink()
    (res / "fidelity.json").write_text(json.dumps({
        "bench": "fidelity", "model": "SmolLM2-135M-Instruct-float32", "dtype": "bfloat16", "requests": 40,
        "host": "2-core x86 VM, AMX", "command": "python bench/fidelity_bench.py --requests 40",
        "workloads": ["rag"], "rows": [
            _fidelity_row("rag", "vllm", 1.0, 0.72, 0.0, 1.0), _fidelity_row("rag", "vllm-nopc", 1.0, 0.72, 0.0, 1.07),
            _fidelity_row("rag", "kvreuse-exact", 1.0, 0.72, 0.19, 0.93),
            _fidelity_row("rag", "kvreuse-fast", 0.3, 0.57, 0.84, 0.33)]}))
    body = rt.fidelity_table(res)
    assert "| workload | vLLM alone: accuracy | noise floor" in body and "`exact` | `fast` |" in body
    assert "| rag | 72% | 100% · 1.07 / 1.17 | 100% · 72% · 19% · 0.93 / 1.03 | 30% · 57% · 84% · 0.33 / 0.43 |" in body
    assert "python bench/fidelity_bench.py --requests 40" in body and "2-core x86 VM, AMX" in body


def test_configs_table_names_the_server_arguments(tree: Path):
    res = tree / "bench" / "results"
    for p in res.glob("fidelity*.json"):
        p.unlink()
    args = "--speculative-config '{\"method\": \"ngram\"}'"
    (res / "fidelity_config_specdecode_epyc.json").write_text(json.dumps({
        "bench": "fidelity", "model": "SmolLM2-135M-Instruct-float32", "dtype": "bfloat16", "requests": 40,
        "host": "AMD EPYC, 2 cores, no AMX", "vllm_args": args,
        "command": f"python bench/fidelity_bench.py --vllm-args={args}", "workloads": ["rag"], "rows": [
            _fidelity_row("rag", "vllm", 1.0, 0.72, 0.0, 1.0), _fidelity_row("rag", "vllm-nopc", 0.95, 0.72, 0.0, 1.02),
            _fidelity_row("rag", "kvreuse-default", 1.0, 0.72, 0.19, 0.93)]}))
    assert rt.fidelity_table(res) == "(no fidelity results)"  # not a fidelity-levels run
    body = rt.configs_table(res)
    assert ("| `--speculative-config '{\"method\": \"ngram\"}'` | rag | kvreuse-default | 100% | 72% (72%) | 95% | 19% | "
            "0.93 / 1.03 | `fidelity_config_specdecode_epyc.json` |") in body
    assert "vllm-nopc |" not in body and f"- `python bench/fidelity_bench.py --vllm-args={args}`" in body
    assert body.startswith("SmolLM2-135M-Instruct in bfloat16, 40 requests a workload")


def test_client_table_puts_agreement_and_noise_floor_beside_ttft(tree: Path):
    res = tree / "bench" / "results"
    for p in res.glob("*_smollm2*.json"):
        p.unlink()
    (res / "rag_smollm2_epyc.json").write_text(json.dumps({
        "bench": "rag", "host": "AMD EPYC, 2 cores, no AMX",
        "command": "python bench/rag_bench.py --model smollm2 --concurrency 1 --prompts 40",
        "args": {"per_prompt": 4, "passages": 12, "joiner": "\n\n", "dtype": "bfloat16", "kvreuse_config": None},
        "summary": {"mean_ttft_ratio": 0.96, "median_ttft_ratio": 0.94, "p99_ttft_ratio": 0.97, "throughput_ratio": 1.05,
                    "placed_share": 0.05, "same_output": 0.75, "same_output_count": [90, 120],
                    "noise_floor_same_output": 0.9, "noise_floor_same_output_count": [108, 120]}}))
    body = rt.client_table(res)
    assert ("| RAG: 4 of 12 passages, random order, joined by blank lines | bf16 | 5.0% | 0.96 · 0.94 · 0.97 | 1.05× | "
            "75% (90/120) | 90% (108/120) | [1] |") in body
    assert "1. `python bench/rag_bench.py --model smollm2 --concurrency 1 --prompts 40`" in body


def _slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_resolve():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for doc in docs:
        for target in re.findall(r"\]\(([^)]+)\)", doc.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            assert dest.exists(), f"{doc.name}: {target}"
            if anchor:
                heads = {_slug(h) for h in re.findall(r"^#+ (.+)$", dest.read_text(), re.M)}
                assert anchor in heads, f"{doc.name}: {target}"


def test_replay_table(tree: Path):
    res = tree / "bench" / "results"
    for p in res.glob("repair_frontier*.json"):
        p.unlink()
    row = {"workload": "rag", "arm": "fast+gold", "config": {"policy": {"fidelity": "fast"}, "force": "gold"}, "n": 40,
           "same_answer": 0.375, "accuracy": 0.65, "accuracy_ref": 0.725, "placed_share": 0.7, "steps_mean": 1.62,
           "ttft_est_mean": 0.45}
    (res / "repair_frontier_epyc.json").write_text(json.dumps({
        "bench": "repair_frontier", "model": "SmolLM2-135M-Instruct-float32", "dtype": "float32", "requests": 40,
        "host": "AMD EPYC, 2 cores, no AMX", "command": "python bench/repair_frontier.py", "step_ms": 22.0,
        "token_ms": 0.6, "rows": [row]}))
    body = rt.replay_table(res)
    assert body.startswith("SmolLM2-135M-Instruct in float32, 40 requests a workload, replayed")
    assert ('| rag | fast+gold `{"policy": {"fidelity": "fast"}, "force": "gold"}` | 38% | 65% (72%) | 70% | 1.62 | '
            '0.45 |') in body
    assert "`python bench/repair_frontier.py`" in body and "AMD EPYC, 2 cores, no AMX" in body
