"""vLLM's paged KV-cache layouts: where token t of head h lands, for each attention backend.

A slot is `block_id * block_size + offset`, as in vLLM's `slot_mapping`.  Reference scatter and
gather here are plain PyTorch (the oracle of the fused kernels and the CPU path).

Layouts (one layer's cache tensor):
  * ``CPU_ATTN`` — vLLM's CPU backend: `[num_blocks, num_kv_heads, block_size, 2 * head_size]`
    whose bytes per (block, head) are the block's keys *transposed* (`[head_size, block_size]`)
    followed by its values (`[block_size, head_size]`), as the C++ reshape-and-cache writes them.
  * ``FLASH`` — FlashAttention: `[2, num_blocks, block_size, num_kv_heads, head_size]`.
  * ``HND`` — FlashInfer's HND: `[num_blocks, 2, num_kv_heads, block_size, head_size]`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class Layout(enum.Enum):
    CPU_ATTN = "cpu_attn"
    FLASH = "flash"
    HND = "hnd"


@dataclass(frozen=True)
class PagedSpec:
    """Geometry of one layer's paged cache."""

    layout: Layout
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_size: int

    @classmethod
    def of(cls, kv_cache: torch.Tensor, layout: Layout, *, num_kv_heads: int | None = None,
           head_size: int | None = None) -> "PagedSpec":
        """Read the geometry off a cache tensor (checked against the expected heads/head size)."""
        s = tuple(kv_cache.shape)
        if layout is Layout.CPU_ATTN:
            if len(s) != 4 or s[3] % 2:
                raise ValueError(f"CPU_ATTN cache must be [blocks, heads, block_size, 2*head_size], got {list(s)}")
            spec = cls(layout, s[0], s[2], s[1], s[3] // 2)
        elif layout is Layout.FLASH:
            if len(s) != 5 or s[0] != 2:
                raise ValueError(f"FLASH cache must be [2, blocks, block_size, heads, head_size], got {list(s)}")
            spec = cls(layout, s[1], s[2], s[3], s[4])
        else:
            if len(s) != 5 or s[1] != 2:
                raise ValueError(f"HND cache must be [blocks, 2, heads, block_size, head_size], got {list(s)}")
            spec = cls(layout, s[0], s[3], s[2], s[4])
        if num_kv_heads is not None and spec.num_kv_heads != num_kv_heads:
            raise ValueError(f"cache has {spec.num_kv_heads} KV heads, expected {num_kv_heads}")
        if head_size is not None and spec.head_size != head_size:
            raise ValueError(f"cache has head size {spec.head_size}, expected {head_size}")
        return spec

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size


def _views(kv_cache: torch.Tensor, spec: PagedSpec) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Views `(k_view, v_view)` indexable as `[block, offset, head, dim]` (order noted in the str)."""
    if spec.layout is Layout.FLASH:
        return kv_cache[0], kv_cache[1], "b o h d"
    if spec.layout is Layout.HND:
        return kv_cache[:, 0], kv_cache[:, 1], "b h o d"
    bs, d = spec.block_size, spec.head_size
    flat = kv_cache.view(spec.num_blocks, spec.num_kv_heads, 2 * bs * d)
    k_t = flat[..., : bs * d].view(spec.num_blocks, spec.num_kv_heads, d, bs)   # K^T per (block, head)
    v = flat[..., bs * d:].view(spec.num_blocks, spec.num_kv_heads, bs, d)
    return k_t, v, "b h d o|b h o d"


def _split(slots: torch.Tensor, spec: PagedSpec) -> tuple[torch.Tensor, torch.Tensor]:
    slots = slots.long()
    if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= spec.num_slots):
        raise ValueError(f"slot_mapping entries must lie in [0, {spec.num_slots}); got "
                         f"[{int(slots.min())}, {int(slots.max())}]")
    return slots // spec.block_size, slots % spec.block_size


def scatter_kv(kv_cache: torch.Tensor, spec: PagedSpec, k: torch.Tensor, v: torch.Tensor,
               slot_mapping: torch.Tensor) -> None:
    """Write `k, v: [num_tokens, num_kv_heads, head_size]` into `kv_cache` at `slot_mapping: [num_tokens]`."""
    if k.shape != v.shape or k.shape[1:] != (spec.num_kv_heads, spec.head_size):
        raise ValueError(f"k {list(k.shape)} / v {list(v.shape)} do not match the cache's "
                         f"[*, {spec.num_kv_heads}, {spec.head_size}]")
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping must be [{k.shape[0]}], got {list(slot_mapping.shape)}")
    blk, off = _split(slot_mapping.to(kv_cache.device), spec)
    kv, vv, order = _views(kv_cache, spec)
    k, v = k.to(kv_cache.dtype), v.to(kv_cache.dtype)
    if order == "b o h d":
        kv[blk, off] = k
        vv[blk, off] = v
    elif order == "b h o d":
        kv.permute(0, 2, 1, 3)[blk, off] = k
        vv.permute(0, 2, 1, 3)[blk, off] = v
    else:
        kv.permute(0, 3, 1, 2)[blk, off] = k
        vv.permute(0, 2, 1, 3)[blk, off] = v


def gather_kv(kv_cache: torch.Tensor, spec: PagedSpec, slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Read `(k, v)`, each `[num_tokens, num_kv_heads, head_size]`, from the slots in `slot_mapping`."""
    blk, off = _split(slot_mapping.to(kv_cache.device), spec)
    kv, vv, order = _views(kv_cache, spec)
    if order == "b o h d":
        return kv[blk, off], vv[blk, off]
    if order == "b h o d":
        return kv.permute(0, 2, 1, 3)[blk, off], vv.permute(0, 2, 1, 3)[blk, off]
    return kv.permute(0, 3, 1, 2)[blk, off], vv.permute(0, 2, 1, 3)[blk, off]


def block_slots(block_ids: list[int] | torch.Tensor, block_size: int, start: int, end: int) -> torch.Tensor:
    """Slots of token positions `[start, end)` of a request whose blocks are `block_ids`. # [end - start]"""
    ids = torch.as_tensor(block_ids, dtype=torch.long)
    t = torch.arange(start, end)
    if end > ids.numel() * block_size:
        raise ValueError(f"tokens up to {end} need {-(-end // block_size)} blocks, request has {ids.numel()}")
    return ids[t // block_size] * block_size + t % block_size
