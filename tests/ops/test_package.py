"""What `pip install kvreuse` ships: the library, the connector, the CLI, the kernels and the tiny
models `make demo` serves; no benchmark harness, no test hook.

Builds the wheel from a copy of the sources (the build writes into its source tree) with the venv's
own setuptools and torch, the CUDA extension off.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ["pyproject.toml", "setup.py", "README.md", "kvreuse", "kernels", "csrc"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        elif path.exists():
            shutil.copy(path, src / name)
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(src)], check=True, env={**os.environ, "KVREUSE_BUILD_CUDA": "0"}, capture_output=True)
    (whl,) = out.glob("kvreuse-*.whl")
    return zipfile.ZipFile(whl)


def test_wheel_holds_the_product_only(wheel):
    names = wheel.namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"kvreuse"}, top
    modules = {n for n in names if n.endswith(".py")}
    for needed in ("kvreuse/cli.py", "kvreuse/connector/connector.py", "kvreuse/connector/plugin.py",
                   "kvreuse/store/store.py", "kvreuse/ops/__init__.py", "kvreuse/kernels/__init__.py",
                   "kvreuse/models/tiny.py", "kvreuse/models/trace.py"):
        assert needed in modules, f"{needed} missing from the wheel"
    assert not any(n.startswith(("kvreuse/quality/", "tests/", "bench/", "server/")) for n in names)
    hooks = [n for n in modules if b"KVREUSE_TEST_" in wheel.read(n) or b"embed_multimodal" in wheel.read(n)]
    assert not hooks, f"test hooks in the installed package: {hooks}"


def test_wheel_entry_points(wheel):
    (ep,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    text = wheel.read(ep).decode()
    assert "[vllm.general_plugins]" in text and "kvreuse = kvreuse.connector.plugin:register" in text
    assert "[console_scripts]" in text and "kvreuse = kvreuse.cli:main" in text
