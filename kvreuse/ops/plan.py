"""Host-side packing shared by the Triton and CUDA kernels.

A kernel sees a whole store entry (or one layer) as: inputs `[L, N, H, D]`, a destination addressed
as `base + layer_off[l] + blk * s_blk + off * s_off + h * s_h + d` (V at `+ s_kv`), the rotation
either as the fp32 delta table or as scaled positions + `inv_freq`, and each layer's patch factors
as element offsets from one base pointer (layers are separate tensors).  Building that description
once here keeps the two kernels' launchers thin and identical in meaning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvreuse.ops import reference
from kvreuse.layout import PagedLayout
from kvreuse.rope.spec import RopeSpec


@dataclass
class Dest:
    """Where a kernel writes (or, for gather, reads) layer l's token slots."""

    base: torch.Tensor        # tensor of layer 0 (its dtype is the cache dtype)
    layer_off: torch.Tensor   # [L] int64, element offset of each layer's tensor from `base`
    s_kv: int                 # K plane -> V plane
    s_blk: int
    s_off: int
    s_h: int
    block_size: int
    num_slots: int
    slots: torch.Tensor | None  # [N] int32/int64; None = token index (dense output)
    host_offsets: tuple[int, ...] = ()  # layer_off on the host (alignment checks without a sync)


@dataclass
class Angles:
    """The rotation src -> dst: a `[N, half]` fp32 table, or what the kernel needs to build it."""

    cos: torch.Tensor | None = None    # [N, half] fp32
    sin: torch.Tensor | None = None
    t_src: torch.Tensor | None = None  # [A, N] fp32 fl32(pos / divisor), A = 1 or 3
    t_dst: torch.Tensor | None = None
    inv_freq: torch.Tensor | None = None  # [half] fp32
    axis: torch.Tensor | None = None      # [half] int32
    mscale: float = 1.0                   # table magnitude (cancels when normalize)
    row_round: int = 0                    # table rows rounded to: 0 none, 1 bf16, 2 fp16
    normalize: bool = False               # divide by c_s² + s_s² (exact inverse of the source row)

    @property
    def use_table(self) -> bool:
        return self.cos is not None


@dataclass
class FactorPack:
    """One kind (K or V) of per-layer factors: A `[N, H, r_l]`, B `[H, r_l, D]`, contiguous."""

    a_base: torch.Tensor
    a_off: torch.Tensor   # [L] int64
    b_base: torch.Tensor
    b_off: torch.Tensor   # [L] int64
    ranks: torch.Tensor   # [L] int32
    max_rank: int
    keep: list            # the per-layer tensors the offsets point into (kept alive until launch)


def host_offsets(tensors: list[torch.Tensor]) -> tuple[int, ...]:
    size = tensors[0].element_size()
    return tuple((t.data_ptr() - tensors[0].data_ptr()) // size for t in tensors)


def offsets(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Element offsets of each tensor's first element from the first tensor's. # [L] int64"""
    base = tensors[0]
    size = base.element_size()
    offs = []
    for t in tensors:
        diff = t.data_ptr() - base.data_ptr()
        if t.dtype != base.dtype or t.device != base.device:
            raise ValueError("per-layer tensors must share dtype and device "
                             f"({t.dtype} on {t.device} vs {base.dtype} on {base.device})")
        assert diff % size == 0, "per-layer tensors are not element-aligned to each other"
        offs.append(diff // size)
    if len(offs) == 1:
        return torch.zeros(1, dtype=torch.int64, device=device)
    return torch.tensor(offs, dtype=torch.int64).to(device, non_blocking=True)


def paged_dest(caches: list[torch.Tensor], layout: PagedLayout, slots: torch.Tensor | None) -> Dest:
    """A `Dest` over vLLM caches (one `[B, H, N, C]` view per layer, all with `layout`'s strides)."""
    c0 = caches[0]
    for c in caches:
        layout.check(c, "every layer's cache")
    strides = layout.kernel_strides()
    if strides is None:
        raise ValueError(f"the fused kernels cannot address a {layout.reading.value} cache "
                         f"(strides {layout.strides}); use the reference")
    s_kv, s_blk, s_off, s_h = strides
    return Dest(c0, offsets(caches, c0.device), s_kv, s_blk, s_off, s_h, layout.kernel_block_size,
                layout.num_slots, slots, host_offsets(caches))


def dense_dest(out: torch.Tensor) -> Dest:
    """A `Dest` over a dense `[L, N, H, D]` output (slot = token index)."""
    L, N, H, D = out.shape
    assert out.is_contiguous()
    offs = torch.arange(L, dtype=torch.int64, device=out.device) * (N * H * D)
    return Dest(out, offs, 0, H * D, 0, D, 1, N, None, tuple(l * N * H * D for l in range(L)))


def angles(rope: RopeSpec, src: torch.Tensor, dst: torch.Tensor, device: torch.device, table: bool,
           dtype: torch.dtype) -> Angles:
    """Prepare the rotation `src -> dst` (`[N]` or `[3, N]` int64) for keys of `dtype`.

    The table is the reference's own (`delta_cos_sin`, in fp32, with the same source-table rounding
    as `relocate_reference` uses for `dtype`); the in-kernel form carries what rebuilds it.
    """
    src, dst = src.to(device), dst.to(device)
    src_table = getattr(reference, "source_table_dtype", lambda _: None)(dtype)
    normalized = hasattr(reference, "source_table_dtype")   # reference composes (c, -s) / (c² + s²)
    if table:
        if normalized:
            cos, sin = reference.delta_cos_sin(rope, src, dst, torch.float32, src_table)
        else:
            cos, sin = reference.delta_cos_sin(rope, src, dst)
        return Angles(cos=cos.to(torch.float32).contiguous(), sin=sin.to(torch.float32).contiguous())
    if src.dim() != dst.dim():
        src = src if src.dim() == 2 else src.view(1, -1).expand(3, -1)
        dst = dst if dst.dim() == 2 else dst.view(1, -1).expand(3, -1)
    t_src = src.view(-1, src.shape[-1]).to(torch.float32)
    t_dst = dst.view(-1, dst.shape[-1]).to(torch.float32)
    if rope.position_divisor != 1.0:          # same fp32 division as RopeSpec.angles
        t_src, t_dst = t_src / rope.position_divisor, t_dst / rope.position_divisor
    half = rope.rotary_dim // 2
    if t_src.shape[0] == 3:
        axis = rope._axis_of_freq.to(device=device, dtype=torch.int32)
    else:
        axis = torch.zeros(half, dtype=torch.int32, device=device)
    return Angles(t_src=t_src.contiguous(), t_dst=t_dst.contiguous(), inv_freq=rope.inv_freq.to(device),
                  axis=axis, mscale=rope.mscale if normalized else 1.0,
                  row_round={None: 0, torch.bfloat16: 1, torch.float16: 2}[src_table], normalize=normalized)


def factor_pack(factors: list, device: torch.device) -> FactorPack | None:
    """Pack per-layer `Factors | None` (None = rank 0); None when every layer has rank 0."""
    present = [f for f in factors if f is not None]
    if not present:
        return None
    dtype = present[0].a.dtype
    a_list, b_list, ranks = [], [], []
    for f in factors:
        if f is None:
            a_list.append(None)
            b_list.append(None)
            ranks.append(0)
            continue
        a = f.a.to(device=device, dtype=dtype).contiguous()
        b = f.b.to(device=device, dtype=dtype).contiguous()
        a_list.append(a)
        b_list.append(b)
        ranks.append(a.shape[-1])
    a0, b0 = present_first(a_list), present_first(b_list)
    a_off = offsets([a0] + [a if a is not None else a0 for a in a_list], device)[1:]
    b_off = offsets([b0] + [b if b is not None else b0 for b in b_list], device)[1:]
    return FactorPack(a0, a_off.contiguous(), b0, b_off.contiguous(),
                      torch.tensor(ranks, dtype=torch.int32).to(device), max(ranks), a_list + b_list)


def present_first(xs: list) -> torch.Tensor:
    return next(x for x in xs if x is not None)
