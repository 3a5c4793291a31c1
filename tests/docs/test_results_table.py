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
    (tmp_path / "README.md").write_text("# r\n<!-- results:begin -->\n<!-- results:end -->\ntail\n")
    (tmp_path / "docs" / "benchmarks.md").write_text("<!-- results:other:begin -->\n<!-- results:other:end -->\n")
    return tmp_path


def test_check_fails_until_rewritten(tree: Path):
    assert rt.main(["--check", "--root", str(tree)]) == 1
    assert rt.main(["--root", str(tree)]) == 0
    assert rt.main(["--check", "--root", str(tree)]) == 0
    text = (tree / "README.md").read_text()
    assert text.startswith("# r\n<!-- results:begin -->\n| workload |")
    assert text.endswith("<!-- results:end -->\ntail\n")


def test_every_row_names_model_host_and_command(tree: Path):
    rows = rt.main_rows(tree / "bench" / "results") + rt.other_rows(tree / "bench" / "results")
    assert rows
    for r in rows:
        assert r.model and r.host and r.command.startswith("python bench/"), r
    body = rt.main_table(tree / "bench" / "results")
    # a recorded joiner of two newlines is written as the shell would take it
    assert "--joiner $'\\n\\n'" in body
    assert not re.search(r"--out\b", body) and "/tmp/" not in body


def test_fidelity_rows(tree: Path):
    res = tree / "bench" / "results"
    (res / "fidelity.json").write_text(json.dumps({
        "bench": "fidelity", "model": "SmolLM2-135M-Instruct", "host": "2-core x86 VM, AMX",
        "command": "python bench/fidelity_bench.py --requests 80",
        "workloads": {"rag": {"label": "RAG", "arms": {
            "exact": {"same": 79, "n": 80, "accuracy": 0.61, "reference_accuracy": 0.61, "placed_share": 0.07,
                      "ttft_ratio": 0.98},
            "fast": {"agreement": 0.34, "accuracy": 0.35, "placed_share": 0.86, "ttft_ratio": 0.74}}}}}))
    rows = [r for r in rt.main_rows(res) if r.model == "SmolLM2-135M-Instruct"]
    assert [r.workload for r in rows] == ["RAG: exact", "RAG: fast"]
    exact, fast = rows
    assert exact.agreement == "99% (79/80)" and exact.accuracy == "61% (vLLM alone 61%)"
    assert exact.placed == "7.0%" and exact.ttft == "0.98"
    assert fast.agreement == "34%" and fast.accuracy == "35%"
    assert exact.host == "2-core x86 VM, AMX" and exact.command == "python bench/fidelity_bench.py --requests 80"
    assert rt.main_table(res).splitlines()[2].startswith("| RAG: exact | SmolLM2-135M-Instruct |")


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
