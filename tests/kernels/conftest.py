"""Kernel tests: on a CUDA host they run compiled; elsewhere Triton runs under its interpreter.

`TRITON_INTERPRET` is read when a `@triton.jit` function is decorated, so the `interpret`
fixture sets it only while `kvreuse.kernels.relocate` is first imported (and restores it), which
keeps other tests in the same pytest process unaffected.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.fixture(scope="session")
def kernel_device() -> str:
    """Where Triton kernels run in this session: "cuda", or "cpu" under the interpreter."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if HAS_CUDA:
        return "cuda"
    # Triton's own library must be imported compiled-mode (gluon asserts on it) before the switch.
    import triton  # noqa: F401
    import triton.experimental.gluon  # noqa: F401

    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        from kvreuse.ops import backends

        mod = backends.triton_kernels()
        if type(mod.relocate_scatter_kernel).__name__ != "InterpretedFunction":
            pytest.skip("kvreuse.kernels.relocate was imported before TRITON_INTERPRET=1 could apply")
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
    return "cpu"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
