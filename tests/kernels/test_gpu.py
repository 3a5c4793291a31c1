"""GPU-only checks: Triton (compiled) and CUDA kernels against the reference on a CUDA device."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zlib

import pytest
import torch

from kvreuse.ops import backends, gather_paged, relocate_patch_scatter
from kvreuse.ops.paged_reference import relocate_patch_scatter_reference
from kvreuse.paged import Layout, PagedSpec

from tests.kernels.cases import assert_bitwise, assert_close_rounding, make_cache, make_rope, positions, random_patch
from tests.kernels.test_triton import CASES

pytestmark = pytest.mark.gpu


def _backends():
    names = ["triton"]
    if torch.cuda.is_available() and backends.cuda_ext() is not None:
        names.append("cuda")
    return names


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("rope_name,heads,layout,dtype,rank,layers", CASES)
def test_kernel_matches_reference_on_gpu(backend, rope_name, heads, layout, dtype, rank, layers):
    if backend not in _backends():
        pytest.skip("kvreuse._C is not built")
    head_dim, rope = make_rope(rope_name)
    gen = torch.Generator().manual_seed(zlib.crc32(repr((rope_name, heads, layout.value, rank)).encode()))
    n, block_size, num_blocks, dev = 300, 16, 24, "cuda"
    k = torch.randn(layers, n, heads, head_dim, generator=gen).to(dev, dtype)
    v = torch.randn(layers, n, heads, head_dim, generator=gen).to(dev, dtype)
    src, dst = positions(rope, n, gen)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:n]
    slots[::37] = -1
    slots = slots.to(dev)
    patch = random_patch(layers, n, heads, head_dim, rank, dtype, gen, dev) if rank else None
    spec = PagedSpec(layout, num_blocks, block_size, heads, head_dim)
    got = [make_cache(layout, num_blocks, block_size, heads, head_dim, dtype, dev) for _ in range(layers)]
    want = [c.clone() for c in got]
    relocate_patch_scatter(k, v, src, dst, rope, got, spec, slots, patch, backend=backend)
    relocate_patch_scatter_reference(k, v, src.to(dev), dst.to(dev), rope, want, spec, slots, patch)
    torch.cuda.synchronize()
    for layer in range(layers):
        if rank == 0:   # table path, no patch sum: the same fp32 operations as the reference
            assert_bitwise(got[layer], want[layer], f"{backend} layer {layer}")
        else:
            assert_close_rounding(got[layer], want[layer], f"{backend} layer {layer}")
    if backend == "triton":
        for layer in range(layers):
            got[layer].fill_(float("nan"))
        relocate_patch_scatter(k, v, src, dst, rope, got, spec, slots, patch, backend=backend, angles="kernel")
        for layer in range(layers):
            assert_close_rounding(got[layer], want[layer], f"in-kernel angles layer {layer}", flips=True)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("layout", [Layout.FLASH, Layout.HND])
@pytest.mark.parametrize("dtype,heads,head_dim", [(torch.bfloat16, 3, 80), (torch.float16, 5, 96),
                                                  (torch.bfloat16, 8, 128)])
def test_gather_on_gpu(backend, layout, dtype, heads, head_dim):
    if backend not in _backends():
        pytest.skip("kvreuse._C is not built")
    caches = [torch.randn(*make_cache(layout, 20, 16, heads, head_dim, dtype, "cpu").shape).to("cuda", dtype)
              for _ in range(3)]
    spec = PagedSpec.of(caches[0], layout)
    slots = torch.randperm(320)[:200].cuda()
    k, v = gather_paged(caches, spec, slots, backend=backend)
    rk, rv = gather_paged(caches, spec, slots, backend="reference")
    assert torch.equal(k, rk) and torch.equal(v, rv)


SANITIZED = """
import torch
from kvreuse.ops import gather_paged, relocate_patch_scatter
from kvreuse.paged import Layout, PagedSpec
from tests.kernels.cases import make_cache, make_rope, positions, random_patch
for rope_name in ("neox", "gptj-partial", "mla-kpe"):
    d, rope = make_rope(rope_name)
    g = torch.Generator().manual_seed(0)
    h = 1 if rope_name == "mla-kpe" else 3
    k = torch.randn(2, 50, h, d, generator=g).cuda().bfloat16(); v = torch.randn_like(k)
    src, dst = positions(rope, 50, g)
    patch = random_patch(2, 50, h, d, 4, torch.bfloat16, g, "cuda")
    for layout in (Layout.FLASH, Layout.HND):
        caches = [make_cache(layout, 4, 16, h, d, torch.bfloat16, "cuda") for _ in range(2)]
        spec = PagedSpec.of(caches[0], layout)
        slots = torch.randperm(64, generator=g)[:50].cuda()
        relocate_patch_scatter(k, v, src, dst, rope, caches, spec, slots, patch, backend="cuda")
        gather_paged(caches, spec, slots, backend="cuda")
torch.cuda.synchronize()
"""


def test_cuda_kernel_compute_sanitizer_clean():
    if "cuda" not in _backends():
        pytest.skip("kvreuse._C is not built")
    tool = shutil.which("compute-sanitizer")
    if tool is None:
        pytest.skip("compute-sanitizer is not on PATH")
    for check in ("memcheck", "racecheck", "initcheck"):
        r = subprocess.run([tool, "--tool", check, "--error-exitcode", "3", sys.executable, "-c", SANITIZED],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{check}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
