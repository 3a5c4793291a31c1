"""Plain-PyTorch scatter and gather over vLLM's paged cache: the CPU path and the kernels' oracle.

A slot is `block_id * block_size + offset`, as in vLLM's `slot_mapping`; where vLLM splits blocks
into kernel blocks, `slot // kernel_block_size` is the kernel block (see `kvreuse.layout`).  Every
backend's reading of the cache comes from `PagedLayout.views`, so these two functions are the same
for FlashAttention, Triton, FlashInfer, CPU_ATTN and MLA caches.
"""

from __future__ import annotations

import functools

import torch

from kvreuse.errors import KVReuseError
from kvreuse.layout import PagedLayout, Reading


def scatter_kv(kv_cache: torch.Tensor, layout: PagedLayout, k: torch.Tensor, v: torch.Tensor | None,
               slot_mapping: torch.Tensor) -> None:
    """Write `k: [T, H, head_size]`, `v: [T, H, head_size_v]` (None or 0-wide for MLA) at `slot_mapping: [T]`.

    Values are cast to the cache dtype (one rounding where they differ).
    """
    if tuple(k.shape[1:]) != (layout.num_heads, layout.head_size):
        raise ValueError(f"k {list(k.shape)} does not match the cache's [*, {layout.num_heads}, {layout.head_size}]")
    if layout.has_v and (v is None or tuple(v.shape) != (k.shape[0], layout.num_heads, layout.head_size_v)):
        raise ValueError(f"v {None if v is None else list(v.shape)} does not match the cache's "
                         f"[{k.shape[0]}, {layout.num_heads}, {layout.head_size_v}]")
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping must be [{k.shape[0]}], got {list(slot_mapping.shape)}")
    blk, off = layout.split_slots(slot_mapping.to(kv_cache.device))
    k = k.to(device=kv_cache.device, dtype=kv_cache.dtype)
    if layout.reading is Reading.CPU_ATTN_AMX:
        _scatter_tiled(kv_cache, layout, k, v, blk, off)
        return
    kv, vv = layout.views(kv_cache)
    kv[blk, off] = k
    if vv is not None:
        vv[blk, off] = v.to(device=kv_cache.device, dtype=kv_cache.dtype)


def slot_runs(layout: PagedLayout, slot_mapping: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """`slot_mapping: [T]` as maximal runs of consecutive slots inside one kernel block.

    Each run is `(kernel block, first offset, first token, length)`; slots are checked to lie in the
    cache.  A prompt's slots are mostly such runs (a block's worth of tokens each), so a scatter
    by runs is a few strided copies instead of one indexed write per token.
    """
    blk, off = layout.split_slots(slot_mapping)
    if blk.numel() == 0:
        return []
    new = torch.ones_like(blk, dtype=torch.bool)
    new[1:] = (blk[1:] != blk[:-1]) | (off[1:] != off[:-1] + 1)
    first = new.nonzero().flatten()
    last = torch.cat([first[1:], first.new_tensor([blk.numel()])])
    return list(zip(blk[first].tolist(), off[first].tolist(), first.tolist(), (last - first).tolist()))


def scatter_kv_runs(kv_cache: torch.Tensor, layout: PagedLayout, k: torch.Tensor, v: torch.Tensor | None,
                    runs: list[tuple[int, int, int, int]]) -> None:
    """`scatter_kv` for slots given as `slot_runs(layout, slot_mapping)`: the same writes, one copy per run.

    k: `[T, H, head_size]`, v: `[T, H, head_size_v]` (None for MLA), on the cache's device; values are
    cast to the cache dtype (one rounding where they differ).
    """
    if layout.reading is Reading.CPU_ATTN_AMX:  # tokens are tiled: indexed writes
        blk = torch.cat([torch.full((n,), b, dtype=torch.long) for b, _, _, n in runs])
        off = torch.cat([torch.arange(o, o + n) for _, o, _, n in runs])
        rows = torch.cat([torch.arange(t, t + n) for _, _, t, n in runs])
        _scatter_tiled(kv_cache, layout, k[rows], v[rows], blk, off)
        return
    kv, vv = layout.views(kv_cache)
    for b, o, t, n in runs:
        kv[b, o:o + n] = k[t:t + n]
        if vv is not None:
            vv[b, o:o + n] = v[t:t + n]


def _scatter_tiled(kv_cache: torch.Tensor, layout: PagedLayout, k: torch.Tensor, v: torch.Tensor,
                   blk: torch.Tensor, off: torch.Tensor) -> None:
    """CPU_ATTN_AMX: write `k, v: [T, H, D]` at kernel blocks `blk`, offsets `off` through the tiled views."""
    kt, vt = layout.tiled_views(kv_cache)
    t, h, d = k.shape
    kt[blk, off // 16, off % 16] = k.reshape(t, h, d // 2, 2).to(kv_cache.dtype)
    vt[blk, off // 2, off % 2] = v.reshape(t, h, d // 16, 16).to(kv_cache.dtype)


def gather_kv(kv_cache: torch.Tensor, layout: PagedLayout, slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Read `(k, v)`, `[T, H, head_size]` and `[T, H, head_size_v]`, from the slots in `slot_mapping: [T]`.

    MLA caches have no V: `v` is then an empty `[T, 1, 0]` tensor.
    """
    blk, off = layout.split_slots(slot_mapping.to(kv_cache.device))
    if layout.reading is Reading.CPU_ATTN_AMX:  # untile each page touched once (whole-page copies), then pick
        kt, vt = layout.tiled_views(kv_cache)
        pages, idx = torch.unique(blk, return_inverse=True)
        shape = (pages.shape[0], layout.kernel_block_size, layout.num_heads, layout.head_size)
        return kt[pages].reshape(shape)[idx, off], vt[pages].reshape(shape)[idx, off]
    kv, vv = layout.views(kv_cache)
    k = kv[blk, off]
    v = vv[blk, off] if vv is not None else k.new_empty(k.shape[0], layout.num_heads, 0)
    return k, v


def cpu_page_offsets(layout: PagedLayout, slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU_ATTN / CPU_ATTN_AMX: element offsets, from a layer view's first element, of the keys and values
    `[T, H, D]` at `slot_mapping: [T]` (shared by every layer with `layout`).

    Each (block, head) page is the block's keys then its values, `N · D` elements each: keys transposed
    (`[D, N]`) and values `[N, D]`, or on the AMX page keys in 16-token tiles with pairs of dims
    innermost and values in 16-dim tiles with pairs of tokens innermost (`PagedLayout.tiled_views`).
    """
    assert layout.reading in (Reading.CPU_ATTN, Reading.CPU_ATTN_AMX)
    blk, off = layout.split_slots(slot_mapping)
    s_b, s_h = layout.strides[:2]
    k_page, v_page = _page_tables(layout.reading, layout.kernel_block_size, layout.head_size)
    base = (blk * s_b)[:, None, None] + (torch.arange(layout.num_heads) * s_h)[None, :, None]  # [T, H, 1]
    return base + k_page[off][:, None, :], base + v_page[off][:, None, :]


@functools.lru_cache(maxsize=16)
def _page_tables(reading: Reading, n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Offsets within a (block, head) page of each token's `[D]` keys and values: `[N, D]` each."""
    t, dim = torch.arange(n)[:, None], torch.arange(d)[None, :]
    if reading is Reading.CPU_ATTN_AMX:
        k_in = (t // 16) * (16 * d) + (dim // 2) * 32 + (t % 16) * 2 + dim % 2
        v_in = n * d + (dim // 16) * (16 * n) + (t // 2) * 32 + (dim % 16) * 2 + t % 2
    else:
        k_in = dim * n + t
        v_in = n * d + t * d + dim
    return k_in, v_in


def gather_cpu_pages(caches: list[torch.Tensor], layout: PagedLayout,
                     slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`gather_kv` of every layer at once on CPU_ATTN pages: `(k, v)`, each `[L, T, H, D]`.

    One indexed read per layer and tensor, at offsets computed once (`cpu_page_offsets`): the page is
    read in place, whatever its tiling.
    """
    ko, vo = cpu_page_offsets(layout, slot_mapping)
    ko, vo = ko.reshape(-1), vo.reshape(-1)
    span = int(max(int(ko.max()), int(vo.max()))) + 1 if ko.numel() else 0
    shape = (len(caches), slot_mapping.shape[0], layout.num_heads, layout.head_size)
    k = torch.empty(shape, dtype=layout.dtype)
    v = torch.empty(shape, dtype=layout.dtype)
    for i, c in enumerate(caches):
        layout.check(c)
        flat = c.as_strided((span,), (1,), c.storage_offset())
        torch.index_select(flat, 0, ko, out=k[i].view(-1))
        torch.index_select(flat, 0, vo, out=v[i].view(-1))
    return k, v


def block_slots(block_ids: list[int] | torch.Tensor, block_size: int, start: int, end: int) -> torch.Tensor:
    """Slots of token positions `[start, end)` of a request whose blocks are `block_ids`. # [end - start]"""
    ids = torch.as_tensor(block_ids, dtype=torch.long)
    t = torch.arange(start, end)
    if end > ids.numel() * block_size:
        raise ValueError(f"tokens up to {end} need {-(-end // block_size)} blocks, request has {ids.numel()}")
    return ids[t // block_size] * block_size + t % block_size


def check_against_vllm(layout: PagedLayout, write, *, seed: int = 0) -> None:
    """Raise unless kvreuse reads what vLLM's own cache write put there, for this layer's reading.

    `write(key, value, key_cache, value_cache, slot_mapping)`: vLLM's write (for the CPU backend,
    `cpu_attn_reshape_and_cache` with the layer's isa).  Random K/V go into block 1 of a scratch
    cache shaped like the layer's page through `write`; `gather_kv` and the save path's reader
    (`gather_cpu_pages`, for CPU pages) must return them bit for bit.
    """
    n, h, d = layout.kernel_block_size, layout.num_heads, layout.head_size
    scratch = torch.zeros(2, h, n, 2 * d, dtype=layout.dtype)
    lay = PagedLayout(layout.reading, 2, h, n, d, d, tuple(scratch.stride()), layout.dtype, n, layout.backend)
    g = torch.Generator().manual_seed(seed)
    key, value = (torch.randn(n, h, d, generator=g).to(layout.dtype) for _ in range(2))
    kv = scratch.view(2, h, 2 * n, d)
    key_cache, value_cache = kv.chunk(2, dim=2)
    slots = torch.arange(n, 2 * n)
    write(key, value, key_cache, value_cache, slots)
    reads = [gather_kv(scratch, lay, slots)]
    if lay.reading in (Reading.CPU_ATTN, Reading.CPU_ATTN_AMX):
        reads.append(tuple(x[0] for x in gather_cpu_pages([scratch], lay, slots)))
    if not all(torch.equal(k, key) and torch.equal(v, value) for k, v in reads):
        raise KVReuseError(f"kvreuse's reading {layout.reading.value} of backend {layout.backend!r} does not match "
                           f"what vLLM wrote (block size {n}, head size {d}, {layout.dtype}); kvreuse cannot "
                           "address this cache")
