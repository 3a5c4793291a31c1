"""Scatter by slot runs (the worker's CPU load path) writes exactly what the per-token scatter writes."""

from __future__ import annotations

import pytest
import torch

from kvreuse.layout import KV_CACHE_LAYOUTS, PagedLayout, Reading, allocate
from kvreuse.paged import block_slots, scatter_kv, scatter_kv_runs, slot_runs


def caches(reading: Reading, kv_layout: str, *, kernel_block_size: int = 16, block_size: int = 16):
    """Two identical one-layer caches (NaN-filled, so an unwritten slot shows), as `allocate` lays them out."""
    views, lay = allocate(kv_layout, reading, num_layers=1, num_blocks=12, num_heads=3,
                          block_size=kernel_block_size, head_size=8, dtype=torch.bfloat16)
    lay = PagedLayout(lay.reading, lay.num_blocks, lay.num_heads, lay.kernel_block_size, lay.head_size,
                      lay.head_size_v, lay.strides, lay.dtype, block_size, lay.backend, lay.kv_layout)
    twin, _ = allocate(kv_layout, reading, num_layers=1, num_blocks=12, num_heads=3, block_size=kernel_block_size,
                       head_size=8, dtype=torch.bfloat16)
    return views[0], twin[0], lay


SLOT_MAPS = {
    "one run": lambda bs: block_slots([5], bs, 3, 9),
    "blocks out of order": lambda bs: block_slots([7, 2, 9, 0], bs, 5, 3 * bs + 2),
    "segments with gaps": lambda bs: torch.cat([block_slots([4, 1, 8], bs, 0, 7),
                                                block_slots([4, 1, 8], bs, 12, 2 * bs + 5)]),
    "every token its own run": lambda bs: torch.randperm(12 * bs, generator=torch.Generator().manual_seed(0))[:40],
}


@pytest.mark.parametrize("slots", list(SLOT_MAPS))
@pytest.mark.parametrize("reading,kv_layout", [(Reading.CPU_ATTN, "LBHNC"), (Reading.KV_SPLIT, "LBNHC"),
                                               (Reading.KV_SPLIT, "BLHNC"), (Reading.MLA, "LBHNC")])
def test_runs_write_what_scatter_kv_writes(reading, kv_layout, slots):
    assert kv_layout in KV_CACHE_LAYOUTS
    a, b, lay = caches(reading, kv_layout)
    sm = SLOT_MAPS[slots](lay.block_size)
    g = torch.Generator().manual_seed(1)
    k = torch.randn(sm.numel(), lay.num_heads, lay.head_size, generator=g)  # fp32: rounded once by the write
    v = torch.randn(sm.numel(), lay.num_heads, lay.head_size_v, generator=g) if lay.has_v else None
    scatter_kv(a, lay, k, v, sm)
    runs = slot_runs(lay, sm)
    assert sum(n for *_, n in runs) == sm.numel()
    scatter_kv_runs(b, lay, k, v, runs)
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))  # bit for bit, unwritten NaNs included


def test_runs_split_at_kernel_blocks_and_refuse_slots_outside_the_cache():
    _, _, lay = caches(Reading.KV_SPLIT, "LBNHC", kernel_block_size=8, block_size=16)
    # scheduler block 3 = kernel blocks 6 and 7: one scheduler block, two runs
    assert slot_runs(lay, block_slots([3], 16, 2, 16)) == [(6, 2, 0, 6), (7, 0, 6, 8)]
    with pytest.raises(ValueError, match="slot_mapping"):
        slot_runs(lay, torch.tensor([0, 12 * 8]))


@pytest.mark.parametrize("slots", list(SLOT_MAPS))
def test_runs_write_what_scatter_kv_writes_on_the_amx_page(slots):
    views, lay = allocate("LBHNC", Reading.CPU_ATTN, num_layers=2, num_blocks=12, num_heads=2, block_size=32,
                          head_size=16, dtype=torch.bfloat16)
    lay = PagedLayout(Reading.CPU_ATTN_AMX, lay.num_blocks, lay.num_heads, lay.kernel_block_size, lay.head_size,
                      lay.head_size_v, lay.strides, lay.dtype, 32, lay.backend, lay.kv_layout)
    a, b = views
    sm = SLOT_MAPS[slots](32)
    g = torch.Generator().manual_seed(2)
    k, v = (torch.randn(sm.numel(), 2, 16, generator=g) for _ in range(2))
    scatter_kv(a, lay, k, v, sm)
    scatter_kv_runs(b, lay, k, v, slot_runs(lay, sm))
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.parametrize("slots", list(SLOT_MAPS))
@pytest.mark.parametrize("amx", [False, True])
def test_cpu_pages_gather_all_layers_as_gather_kv_reads_each(amx, slots):
    """The save path's CPU read (`gather_cpu_pages`: offsets computed once, one indexed read per layer) returns
    what the per-layer views read, on layers that are views into one allocation (nonzero storage offsets)."""
    from kvreuse.paged import gather_cpu_pages, gather_kv

    views, lay = allocate("LBHNC", Reading.CPU_ATTN, num_layers=3, num_blocks=12, num_heads=2, block_size=32,
                          head_size=16, dtype=torch.bfloat16)
    if amx:
        lay = PagedLayout(Reading.CPU_ATTN_AMX, lay.num_blocks, lay.num_heads, lay.kernel_block_size, lay.head_size,
                          lay.head_size_v, lay.strides, lay.dtype, 32, lay.backend, lay.kv_layout)
    g = torch.Generator().manual_seed(3)
    for c in views:
        c.copy_(torch.randn(c.shape, generator=g))
    assert views[1].storage_offset() > 0
    sm = SLOT_MAPS[slots](32)
    k, v = gather_cpu_pages(views, lay, sm)
    assert k.shape == v.shape == (3, sm.numel(), 2, 16)
    for i, c in enumerate(views):
        rk, rv = gather_kv(c, lay, sm)
        assert torch.equal(k[i], rk) and torch.equal(v[i], rv)
