"""Boundary checks shared by every implementation of the operator: clear errors, no silent casts."""

from __future__ import annotations

import torch

from kvreuse.rope.spec import RopeSpec

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_kv(name: str, x: torch.Tensor, rope: RopeSpec | None = None, ndim: tuple[int, ...] = (3, 4)) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16/bfloat16/float32/float64, got {x.dtype}")
    if x.dim() not in ndim:
        shapes = " or ".join({3: "[num_tokens, num_kv_heads, head_dim]",
                              4: "[num_layers, num_tokens, num_kv_heads, head_dim]"}[n] for n in ndim)
        raise ValueError(f"{name} must be {shapes}, got shape {list(x.shape)}")
    if rope is not None and x.shape[-1] < rope.rot_offset + rope.rotary_dim:
        raise ValueError(f"{name} head_dim {x.shape[-1]} is smaller than the rotary slice "
                         f"[{rope.rot_offset}, {rope.rot_offset + rope.rotary_dim})")


def check_positions_pair(rope: RopeSpec, src_pos, dst_pos, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    src = rope.check_positions(src_pos)
    dst = rope.check_positions(dst_pos)
    for name, p in (("src_pos", src), ("dst_pos", dst)):
        if p.shape[-1] != num_tokens:
            raise ValueError(f"{name} covers {p.shape[-1]} tokens but k has {num_tokens}")
    return src, dst


def check_same(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} {list(a.shape)} and {name_b} {list(b.shape)} must have the same shape")
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a} ({a.dtype}) and {name_b} ({b.dtype}) must have the same dtype")
    if a.device != b.device:
        raise ValueError(f"{name_a} ({a.device}) and {name_b} ({b.device}) must be on the same device")
