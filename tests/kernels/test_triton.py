"""Triton kernels against the PyTorch reference (compiled on CUDA, interpreted on CPU)."""

from __future__ import annotations

import zlib

import pytest
import torch

from kvreuse.layout import Reading
from kvreuse.ops import gather, place, relocate
from kvreuse.ops.paged_reference import place_reference

from tests.kernels.cases import ROPES, assert_close_rounding, make_caches, make_rope, positions, random_patch

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


CASES = [  # rope, heads, vLLM KVCacheLayout, dtype, rank, layers (MLA: the latent cache, one head)
    ("neox", 4, "LBNHC", torch.bfloat16, 0, 2),
    ("neox", 4, "LBHNC", torch.bfloat16, 4, 2),
    ("gptj", 3, "BLNHC", torch.float16, 4, 3),
    ("gptj", 5, "BLHNC", torch.float16, 0, 1),
    ("neox-partial", 5, "LHBNC", torch.float16, 3, 3),
    ("gptj-partial", 3, "BHLNC", torch.bfloat16, 2, 2),
    ("neox-linear", 3, "LBNHC", torch.bfloat16, 1, 2),
    ("mrope", 4, "LBHNC", torch.bfloat16, 4, 3),
    ("mrope-interleaved", 3, "BLNHC", torch.float16, 2, 2),
    ("mla-kpe", 1, "LBNHC", torch.bfloat16, 2, 2),
]


def reading_of(rope_name: str) -> Reading:
    return Reading.MLA if rope_name == "mla-kpe" else Reading.KV_SPLIT


@pytest.mark.parametrize("angles", ["table", "kernel"])
@pytest.mark.parametrize("rope_name,heads,kv_layout,dtype,rank,layers", CASES)
def test_place_matches_reference(kernel_device, rope_name, heads, kv_layout, dtype, rank, layers, angles):
    head_dim, rope = make_rope(rope_name)
    reading = reading_of(rope_name)
    gen = _gen((rope_name, heads, kv_layout, str(dtype), rank, angles))
    n, block_size, num_blocks = 11, 4, 6
    dev = kernel_device
    k = torch.randn(layers, n, heads, head_dim, generator=gen).to(device=dev, dtype=dtype)
    v = torch.randn(layers, n, heads, head_dim, generator=gen).to(device=dev, dtype=dtype)
    v = v if reading is Reading.KV_SPLIT else None
    src, dst = positions(rope, n, gen)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:n]
    slots[3] = -1                                              # vLLM padding: never written
    slots = slots.to(dev)
    patch = random_patch(layers, n, heads, head_dim, rank, dtype, gen, dev) if rank else None
    got, layout = make_caches(kv_layout, layers, num_blocks, block_size, heads, head_dim, dtype, dev, reading)
    want, _ = make_caches(kv_layout, layers, num_blocks, block_size, heads, head_dim, dtype, dev, reading)
    place(got, layout, k, v, src, dst, slots, rope, patch, backend="triton", angles=angles)
    place_reference(want, layout, k, v, src.to(dev), dst.to(dev), slots, rope, patch)
    for layer in range(layers):
        assert_close_rounding(got[layer], want[layer], f"layer {layer}", flips=angles == "kernel")
    # one layer at a time (layer-wise loading) writes the same thing
    one, _ = make_caches(kv_layout, layers, num_blocks, block_size, heads, head_dim, dtype, dev, reading)
    for layer in range(layers):
        place(one[layer], layout, k[layer], v[layer] if v is not None else None, src, dst, slots, rope, patch,
              patch_layer=layer if patch is not None else None, backend="triton", angles=angles)
        assert torch.equal(one[layer].nan_to_num(7.0), got[layer].nan_to_num(7.0))


def test_rank0_patch_is_no_patch(kernel_device):
    head_dim, rope = make_rope("neox")
    gen = _gen(5)
    layers, n, heads = 2, 9, 4
    k = torch.randn(layers, n, heads, head_dim, generator=gen).to(kernel_device, torch.bfloat16)
    v = torch.randn_like(k)
    src, dst = positions(rope, n, gen)
    slots = torch.arange(n, device=kernel_device)
    empty = random_patch(layers, n, heads, head_dim, 0, torch.bfloat16, gen, kernel_device)
    a, layout = make_caches("LBNHC", layers, 4, 4, heads, head_dim, torch.bfloat16, kernel_device)
    b, _ = make_caches("LBNHC", layers, 4, 4, heads, head_dim, torch.bfloat16, kernel_device)
    place(a, layout, k, v, src, dst, slots, rope, empty, backend="triton")
    place(b, layout, k, v, src, dst, slots, rope, None, backend="triton")
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


@pytest.mark.parametrize("kv_layout,reading", [("LBNHC", Reading.KV_SPLIT), ("BHLNC", Reading.KV_SPLIT),
                                               ("LHBNC", Reading.MLA)])
@pytest.mark.parametrize("dtype,heads,head_dim", [(torch.bfloat16, 3, 80), (torch.float16, 5, 96),
                                                  (torch.bfloat16, 4, 128)])
def test_gather_matches_reference(kernel_device, kv_layout, reading, dtype, heads, head_dim):
    gen = _gen((kv_layout, reading.value, heads, head_dim))
    layers, num_blocks, block_size, n = 2, 5, 4, 13
    caches, layout = make_caches(kv_layout, layers, num_blocks, block_size, heads, head_dim, dtype, kernel_device,
                                 reading)
    for c in caches:
        c.copy_(torch.randn(c.shape, generator=gen))
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:n].to(kernel_device)
    k, v = gather(caches, layout, slots, backend="triton")
    rk, rv = gather(caches, layout, slots, backend="reference")
    assert torch.equal(k, rk) and torch.equal(v, rv)
    k1, v1 = gather(caches[1], layout, slots.int(), backend="triton")
    assert torch.equal(k1, rk[1]) and torch.equal(v1, rv[1])
