"""Which implementation runs a call: CUDA extension, Triton kernel or PyTorch reference.

Chosen per call (never at import time): an explicit `backend=` wins, then the
`KVREUSE_OPS_BACKEND` environment variable, then `auto` — CUDA if `kvreuse._C` imports and the
tensors are on a CUDA device, else Triton on CUDA tensors, else the reference.  Forcing `triton`
on CPU tensors is how the tests run the kernels under `TRITON_INTERPRET=1`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import torch

BACKENDS = ("reference", "triton", "cuda")
ENV_VAR = "KVREUSE_OPS_BACKEND"


def choose(device: torch.device, backend: str | None = None, *, kernel_ok: bool = True) -> str:
    """Name of the implementation for tensors on `device`.

    kernel_ok: False when the call's layout or dtype has no kernel (e.g. CPU_ATTN, float64); then
    `auto` picks the reference and an explicit kernel backend raises.
    """
    name = (backend or os.environ.get(ENV_VAR) or "auto").strip().lower()
    if name == "auto":
        if not kernel_ok or device.type != "cuda":
            return "reference"
        if cuda_ext() is not None:
            return "cuda"
        return "triton" if triton_available() else "reference"
    if name not in BACKENDS:
        raise ValueError(f"unknown ops backend {name!r} (from backend= or ${ENV_VAR}); "
                         f"expected one of {('auto',) + BACKENDS}")
    if name != "reference" and not kernel_ok:
        raise ValueError(f"backend {name!r} does not handle this call (layout/dtype); use 'reference'")
    if name == "cuda":
        if cuda_ext() is None:
            raise RuntimeError("backend 'cuda' requested but the kvreuse._C extension is not built "
                               "(pip install on a host with nvcc and a CUDA build of torch)")
        if device.type != "cuda":
            raise ValueError(f"backend 'cuda' needs CUDA tensors, got {device}")
    if name == "triton" and not triton_available():
        raise RuntimeError("backend 'triton' requested but triton is not installed")
    return name


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_kernels() -> ModuleType:
    """`kvreuse.kernels.relocate` (imports triton on first use)."""
    try:
        return importlib.import_module("kvreuse.kernels.relocate")
    except ModuleNotFoundError as e:
        if e.name not in ("kvreuse.kernels", "kvreuse.kernels.relocate"):
            raise
    # Source checkout whose install does not map `kernels/` to `kvreuse.kernels` yet.
    root = Path(__file__).resolve().parents[2] / "kernels"
    if not (root / "relocate.py").is_file():
        raise ModuleNotFoundError("kvreuse.kernels is not installed and no kernels/ directory was found")
    spec = importlib.util.spec_from_file_location("kvreuse.kernels", root / "__init__.py",
                                                  submodule_search_locations=[str(root)])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules["kvreuse.kernels"] = pkg
    spec.loader.exec_module(pkg)
    return importlib.import_module("kvreuse.kernels.relocate")


_EXT: list = []  # memo of the extension lookup: [module or None]


def cuda_ext() -> ModuleType | None:
    """The compiled `kvreuse._C` extension, or None where it was not built."""
    if not _EXT:
        try:
            _EXT.append(importlib.import_module("kvreuse._C"))
        except ImportError:
            _EXT.append(None)
    return _EXT[0]


def use_cuda_ext(module: ModuleType) -> None:
    """Register a JIT-built extension (the benchmark builds one when setup.py did not)."""
    _EXT[:] = [module]
