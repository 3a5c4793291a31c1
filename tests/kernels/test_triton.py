"""Triton kernels against the PyTorch reference (compiled on CUDA, interpreted on CPU)."""

from __future__ import annotations

import zlib

import pytest
import torch

from kvreuse.ops import gather_paged, relocate, relocate_patch_scatter
from kvreuse.ops.paged_reference import relocate_patch_scatter_reference
from kvreuse.paged import Layout, PagedSpec

from tests.kernels.cases import (ROPES, assert_close_rounding, make_cache, make_rope, positions,
                                 random_patch)

DTYPES = [torch.bfloat16, torch.float16]


def _gen(*key) -> torch.Generator:
    """A generator seeded from the case (stable across runs; str hashes are not)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


@pytest.mark.parametrize("angles", ["table", "kernel"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rope_name", list(ROPES))
def test_relocate_matches_reference(kernel_device, rope_name, dtype, angles):
    head_dim, rope = make_rope(rope_name)
    gen = _gen((rope_name, str(dtype), angles))
    heads = 1 if rope_name == "mla-kpe" else 3
    k = torch.randn(2, 7, heads, head_dim, generator=gen).to(device=kernel_device, dtype=dtype)
    src, dst = positions(rope, 7, gen)
    out = relocate(k, src, dst, rope, backend="triton", angles=angles)
    ref = relocate(k, src, dst, rope, backend="reference")
    assert_close_rounding(out, ref, rope_name, flips=angles == "kernel")
    # tokens whose position does not change are copied bit for bit (exact (1, 0) rotation)
    still = (src == dst).reshape(-1, src.shape[-1]).all(0)
    assert torch.equal(out[:, still.to(out.device)], k[:, still.to(k.device)])


CASES = [  # rope, heads, layout, dtype, rank, layers
    ("neox", 4, Layout.FLASH, torch.bfloat16, 0, 2),
    ("neox", 4, Layout.HND, torch.bfloat16, 4, 2),
    ("gptj", 3, Layout.FLASH, torch.float16, 4, 3),
    ("gptj", 5, Layout.HND, torch.float16, 0, 1),
    ("neox-partial", 5, Layout.FLASH, torch.float16, 3, 3),
    ("gptj-partial", 3, Layout.HND, torch.bfloat16, 2, 2),
    ("neox-linear", 3, Layout.FLASH, torch.bfloat16, 1, 2),
    ("mrope", 4, Layout.HND, torch.bfloat16, 4, 3),
    ("mrope-interleaved", 3, Layout.FLASH, torch.float16, 2, 2),
    ("mla-kpe", 1, Layout.FLASH, torch.bfloat16, 2, 2),
]


@pytest.mark.parametrize("angles", ["table", "kernel"])
@pytest.mark.parametrize("rope_name,heads,layout,dtype,rank,layers", CASES)
def test_relocate_patch_scatter_matches_reference(kernel_device, rope_name, heads, layout, dtype, rank,
                                                  layers, angles):
    head_dim, rope = make_rope(rope_name)
    gen = _gen((rope_name, heads, layout.value, str(dtype), rank, angles))
    n, block_size, num_blocks = 11, 4, 6
    dev = kernel_device
    k = torch.randn(layers, n, heads, head_dim, generator=gen).to(device=dev, dtype=dtype)
    v = torch.randn(layers, n, heads, head_dim, generator=gen).to(device=dev, dtype=dtype)
    src, dst = positions(rope, n, gen)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:n]
    slots[3] = -1                                              # vLLM padding: never written
    slots = slots.to(dev)
    patch = random_patch(layers, n, heads, head_dim, rank, dtype, gen, dev) if rank else None
    spec = PagedSpec(layout, num_blocks, block_size, heads, head_dim)
    got = [make_cache(layout, num_blocks, block_size, heads, head_dim, dtype, dev) for _ in range(layers)]
    want = [c.clone() for c in got]
    relocate_patch_scatter(k, v, src, dst, rope, got, spec, slots, patch, backend="triton", angles=angles)
    relocate_patch_scatter_reference(k, v, src.to(dev), dst.to(dev), rope, want, spec, slots, patch)
    for layer in range(layers):
        assert_close_rounding(got[layer], want[layer], f"layer {layer}", flips=angles == "kernel")
    # one layer at a time (layer-wise loading) writes the same thing
    one = [make_cache(layout, num_blocks, block_size, heads, head_dim, dtype, dev) for _ in range(layers)]
    for layer in range(layers):
        relocate_patch_scatter(k[layer], v[layer], src, dst, rope, one[layer], spec, slots, patch,
                               patch_layer=layer if patch is not None else None, backend="triton",
                               angles=angles)
        assert torch.equal(one[layer].nan_to_num(7.0), got[layer].nan_to_num(7.0))


def test_rank0_patch_is_no_patch(kernel_device):
    head_dim, rope = make_rope("neox")
    gen = _gen(5)
    layers, n, heads = 2, 9, 4
    k = torch.randn(layers, n, heads, head_dim, generator=gen).to(kernel_device, torch.bfloat16)
    v = torch.randn_like(k)
    src, dst = positions(rope, n, gen)
    slots = torch.arange(n, device=kernel_device)
    spec = PagedSpec(Layout.FLASH, 4, 4, heads, head_dim)
    empty = random_patch(layers, n, heads, head_dim, 0, torch.bfloat16, gen, kernel_device)
    a = [make_cache(Layout.FLASH, 4, 4, heads, head_dim, torch.bfloat16, kernel_device) for _ in range(layers)]
    b = [c.clone() for c in a]
    relocate_patch_scatter(k, v, src, dst, rope, a, spec, slots, empty, backend="triton")
    relocate_patch_scatter(k, v, src, dst, rope, b, spec, slots, None, backend="triton")
    for x, y in zip(a, b):
        assert torch.equal(x.nan_to_num(7.0), y.nan_to_num(7.0))


def test_relocate_round_trip(kernel_device):
    head_dim, rope = make_rope("gptj-partial")
    gen = _gen(11)
    k = torch.randn(1, 13, 3, head_dim, generator=gen).to(kernel_device, torch.float32)
    src, dst = positions(rope, 13, gen)
    there = relocate(k, src, dst, rope, backend="triton")
    back = relocate(there, dst, src, rope, backend="triton")
    torch.testing.assert_close(back, k, atol=2e-5, rtol=1e-5)
    assert torch.equal(relocate(k, src, src, rope, backend="triton"), k)


@pytest.mark.parametrize("layout", [Layout.FLASH, Layout.HND])
@pytest.mark.parametrize("dtype,heads,head_dim", [(torch.bfloat16, 3, 80), (torch.float16, 5, 96),
                                                  (torch.bfloat16, 4, 128)])
def test_gather_matches_reference(kernel_device, layout, dtype, heads, head_dim):
    gen = _gen((layout.value, heads, head_dim))
    layers, num_blocks, block_size, n = 2, 5, 4, 13
    caches = [torch.randn(*make_cache(layout, num_blocks, block_size, heads, head_dim, dtype, "cpu").shape,
                          generator=gen).to(kernel_device, dtype) for _ in range(layers)]
    spec = PagedSpec.of(caches[0], layout)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:n].to(kernel_device)
    k, v = gather_paged(caches, spec, slots, backend="triton")
    rk, rv = gather_paged(caches, spec, slots, backend="reference")
    assert torch.equal(k, rk) and torch.equal(v, rv)
    k1, v1 = gather_paged(caches[1], spec, slots.int(), backend="triton")
    assert torch.equal(k1, rk[1]) and torch.equal(v1, rv[1])
