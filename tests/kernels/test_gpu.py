"""GPU-only checks: Triton (compiled) and CUDA kernels against the reference on a CUDA device."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zlib

import pytest
import torch

from kvreuse.layout import Reading
from kvreuse.ops import backends, gather, place
from kvreuse.ops.paged_reference import place_reference

from tests.kernels.cases import assert_bitwise, assert_close_rounding, make_caches, make_rope, positions, random_patch
from tests.kernels.test_triton import CASES, reading_of

pytestmark = pytest.mark.gpu


def _backends():
    names = ["triton"]
    if torch.cuda.is_available() and backends.cuda_ext() is not None:
        names.append("cuda")
    return names


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("rope_name,heads,kv_layout,dtype,rank,layers", CASES)
def test_kernel_matches_reference_on_gpu(backend, rope_name, heads, kv_layout, dtype, rank, layers):
    if backend not in _backends():
        pytest.skip("kvreuse._C is not built")
    head_dim, rope = make_rope(rope_name)
    reading = reading_of(rope_name)
    gen = torch.Generator().manual_seed(zlib.crc32(repr((rope_name, heads, kv_layout, rank)).encode()))
    n, block_size, num_blocks, dev = 300, 16, 24, "cuda"
    k = torch.randn(layers, n, heads, head_dim, generator=gen).to(dev, dtype)
    v = torch.randn(layers, n, heads, head_dim, generator=gen).to(dev, dtype) if reading is Reading.KV_SPLIT else None
    src, dst = positions(rope, n, gen)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:n]
    slots[::37] = -1
    slots = slots.to(dev)
    patch = random_patch(layers, n, heads, head_dim, rank, dtype, gen, dev) if rank else None
    got, layout = make_caches(kv_layout, layers, num_blocks, block_size, heads, head_dim, dtype, dev, reading)
    want, _ = make_caches(kv_layout, layers, num_blocks, block_size, heads, head_dim, dtype, dev, reading)
    place(got, layout, k, v, src, dst, slots, rope, patch, backend=backend)
    place_reference(want, layout, k, v, src.to(dev), dst.to(dev), slots, rope, patch)
    torch.cuda.synchronize()
    for layer in range(layers):
        if rank == 0:   # table path, no patch sum: the same fp32 operations as the reference
            assert_bitwise(got[layer], want[layer], f"{backend} layer {layer}")
        else:
            assert_close_rounding(got[layer], want[layer], f"{backend} layer {layer}")
    if backend == "triton":
        for layer in range(layers):
            got[layer].fill_(float("nan"))
        place(got, layout, k, v, src, dst, slots, rope, patch, backend=backend, angles="kernel")
        for layer in range(layers):
            assert_close_rounding(got[layer], want[layer], f"in-kernel angles layer {layer}", flips=True)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("kv_layout,reading", [("LBNHC", Reading.KV_SPLIT), ("LBHNC", Reading.KV_SPLIT),
                                               ("BLHNC", Reading.MLA)])
@pytest.mark.parametrize("dtype,heads,head_dim", [(torch.bfloat16, 3, 80), (torch.float16, 5, 96),
                                                  (torch.bfloat16, 8, 128)])
def test_gather_on_gpu(backend, kv_layout, reading, dtype, heads, head_dim):
    if backend not in _backends():
        pytest.skip("kvreuse._C is not built")
    caches, layout = make_caches(kv_layout, 3, 20, 16, heads, head_dim, dtype, "cuda", reading)
    for c in caches:
        c.copy_(torch.randn(c.shape))
    slots = torch.randperm(320)[:200].cuda()
    k, v = gather(caches, layout, slots, backend=backend)
    rk, rv = gather(caches, layout, slots, backend="reference")
    assert torch.equal(k, rk) and torch.equal(v, rv)


def test_auto_dispatch_on_gpu_is_a_kernel():
    """On CUDA tensors the serving path (`place`/`gather` without backend=) runs a fused kernel."""
    assert backends.choose(torch.device("cuda")) in ("cuda", "triton")


SANITIZED = """
import torch
from kvreuse.layout import Reading
from kvreuse.ops import gather, place
from tests.kernels.cases import make_caches, make_rope, positions, random_patch
for rope_name in ("neox", "gptj-partial", "mla-kpe"):
    d, rope = make_rope(rope_name)
    g = torch.Generator().manual_seed(0)
    mla = rope_name == "mla-kpe"
    h = 1 if mla else 3
    k = torch.randn(2, 50, h, d, generator=g).cuda().bfloat16(); v = None if mla else torch.randn_like(k)
    src, dst = positions(rope, 50, g)
    patch = random_patch(2, 50, h, d, 4, torch.bfloat16, g, "cuda")
    for kv_layout in ("LBNHC", "LBHNC", "BLHNC"):
        caches, layout = make_caches(kv_layout, 2, 4, 16, h, d, torch.bfloat16, "cuda",
                                     Reading.MLA if mla else Reading.KV_SPLIT)
        slots = torch.randperm(64, generator=g)[:50].cuda()
        place(caches, layout, k, v, src, dst, slots, rope, patch, backend="cuda")
        gather(caches, layout, slots, backend="cuda")
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
