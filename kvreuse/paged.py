"""Plain-PyTorch scatter and gather over vLLM's paged cache: the CPU path and the kernels' oracle.

A slot is `block_id * block_size + offset`, as in vLLM's `slot_mapping`; where vLLM splits blocks
into kernel blocks, `slot // kernel_block_size` is the kernel block (see `kvreuse.layout`).  Every
backend's reading of the cache comes from `PagedLayout.views`, so these two functions are the same
for FlashAttention, Triton, FlashInfer, CPU_ATTN and MLA caches.
"""

from __future__ import annotations

import torch

from kvreuse.layout import PagedLayout


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
    kv, vv = layout.views(kv_cache)
    kv[blk, off] = k.to(device=kv_cache.device, dtype=kv_cache.dtype)
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
    kv, vv = layout.views(kv_cache)
    for b, o, t, n in runs:
        kv[b, o:o + n] = k[t:t + n]
        if vv is not None:
            vv[b, o:o + n] = v[t:t + n]


def gather_kv(kv_cache: torch.Tensor, layout: PagedLayout, slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Read `(k, v)`, `[T, H, head_size]` and `[T, H, head_size_v]`, from the slots in `slot_mapping: [T]`.

    MLA caches have no V: `v` is then an empty `[T, 1, 0]` tensor.
    """
    blk, off = layout.split_slots(slot_mapping.to(kv_cache.device))
    kv, vv = layout.views(kv_cache)
    k = kv[blk, off]
    v = vv[blk, off] if vv is not None else k.new_empty(k.shape[0], layout.num_heads, 0)
    return k, v


def block_slots(block_ids: list[int] | torch.Tensor, block_size: int, start: int, end: int) -> torch.Tensor:
    """Slots of token positions `[start, end)` of a request whose blocks are `block_ids`. # [end - start]"""
    ids = torch.as_tensor(block_ids, dtype=torch.long)
    t = torch.arange(start, end)
    if end > ids.numel() * block_size:
        raise ValueError(f"tokens up to {end} need {-(-end // block_size)} blocks, request has {ids.numel()}")
    return ids[t // block_size] * block_size + t % block_size
