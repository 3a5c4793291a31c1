"""Plain-PyTorch reference of the relocation operator: the CPU path and every kernel's oracle.

Math is fp32 for 16-bit inputs and fp64 for fp32/fp64 inputs (so that an fp32 cache stays
within the rounding of its own dtype), with a single rounding back to the input dtype.  The
table values themselves are always the engine's fp32 cos/sin.
"""

from __future__ import annotations

import torch

from kvreuse.rope.spec import RopeSpec


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    """Rotate each rotary pair of `x` by the angle whose cos/sin are given.

    x: `[..., num_tokens, num_heads, rotary_dim]` (float); cos, sin: `[num_tokens, rotary_dim // 2]`.
    NeoX pairs channel i with i + d/2; GPT-J pairs 2i with 2i + 1.
    """
    c = cos.unsqueeze(-2).to(x.dtype)  # [N, 1, half]
    s = sin.unsqueeze(-2).to(x.dtype)
    if is_neox:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)


def delta_cos_sin(rope: RopeSpec, src_pos: torch.Tensor, dst_pos: torch.Tensor,
                  dtype: torch.dtype = torch.float32,
                  table_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the map that undoes the table's rotation at src and applies the table's at dst.

    Each table row `(c, s)` is the engine's fp32 `cos/sin(angle) * mscale`, rounded to
    `table_dtype` when the engine rotates in that dtype (vLLM and HF cast the table to the
    activation dtype, so bf16 keys were rotated by a bf16 table).  A row is not exactly a
    unit rotation (`c² + s²` differs from `mscale²` by an fp32 rounding), so the exact inverse is
    `(c, -s) / (c² + s²)`.  Hence `cosΔ = (c_d c_s + s_d s_s) / (c_s² + s_s²)` and
    `sinΔ = (s_d c_s − c_d s_s) / (c_s² + s_s²)`, computed in `dtype`.  Composed from the two table
    rows rather than from `fl(angle_d − angle_s)`: near position 1e5 the fp32 angle difference alone
    loses ~4e-3 rad.  Tokens that do not move get exactly (1, 0): a zero shift is the identity.
    # returns cos, sin: [num_tokens, rotary_dim // 2] in `dtype` (fp32, or fp64 for fp32 caches)
    """
    rows = []
    for pos in (src_pos, dst_pos):
        c, s = rope.cos_sin(pos, with_mscale=True)
        if table_dtype is not None:  # the engine rotates 16-bit keys with its table rounded to that dtype
            c, s = c.to(table_dtype), s.to(table_dtype)
        rows += [c.to(dtype), s.to(dtype)]
    cs, ss, cd, sd = rows
    norm = cs * cs + ss * ss
    cos = (cd * cs + sd * ss) / norm
    sin = (sd * cs - cd * ss) / norm
    same = _same_angle(rope, src_pos, dst_pos)
    if same is not None:
        cos = torch.where(same, torch.ones_like(cos), cos)
        sin = torch.where(same, torch.zeros_like(sin), sin)
    return cos, sin


def _same_angle(rope: RopeSpec, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor | None:
    src, dst = src.long(), dst.long()
    if src.dim() == 1 and dst.dim() == 1:
        return (src == dst)[:, None]
    s3 = src if src.dim() == 2 else src.view(1, -1).expand(3, -1)
    d3 = dst if dst.dim() == 2 else dst.view(1, -1).expand(3, -1)
    eq = (s3 == d3)                                                  # [3, N]
    axis = rope._axis_of_freq.to(eq.device)                          # [half]
    return eq[axis].transpose(0, 1)                                  # [N, half]


def source_table_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """Rounding of the table the engine rotates keys with: vLLM and HF cast their fp32 cos/sin
    table to the activation dtype, so 16-bit keys carry a 16-bit-rounded rotation.  Undoing exactly
    that one (and applying the same at the destination) makes relocated keys what a re-prefill
    would write, and relocation chains invertible to within one rounding."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for 16-bit data; fp64 for fp32/fp64 data."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def relocate_reference(k: torch.Tensor, src_pos: torch.Tensor, dst_pos: torch.Tensor, rope: RopeSpec,
                       delta_k: torch.Tensor | None = None) -> torch.Tensor:
    """Move post-RoPE keys from `src_pos` to `dst_pos` (optionally adding a same-frame residue first).

    k: `[..., num_tokens, num_kv_heads, head_dim]`; delta_k: broadcastable to k, any float dtype.
    Returns a new tensor of k's dtype: channels outside the rotary slice are copied unchanged.
    """
    ct = compute_dtype(k.dtype)
    cos, sin = delta_cos_sin(rope, src_pos.to(k.device), dst_pos.to(k.device), ct, source_table_dtype(k.dtype))
    lo, hi = rope.rot_offset, rope.rot_offset + rope.rotary_dim
    x = k.to(ct)
    if delta_k is not None:
        x = x + delta_k.to(ct)
    out = x.clone()
    out[..., lo:hi] = rotate_pairs(x[..., lo:hi], cos.to(ct), sin.to(ct), rope.is_neox)
    return out.to(k.dtype)


def apply_rope_reference(x: torch.Tensor, pos: torch.Tensor, rope: RopeSpec,
                         compute: torch.dtype = torch.float32) -> torch.Tensor:
    """Apply the model's own table (with its mscale) to un-rotated `x` at `pos`, in `compute`.

    x: `[num_tokens, num_heads, head_dim]`.  Test oracle: with `compute=torch.float64` it is the
    "float64 truth" (the engine's fp32 table applied exactly).
    """
    cos, sin = rope.cos_sin(pos.to(x.device), with_mscale=True)
    lo, hi = rope.rot_offset, rope.rot_offset + rope.rotary_dim
    y = x.to(compute).clone()
    y[..., lo:hi] = rotate_pairs(y[..., lo:hi], cos.to(compute), sin.to(compute), rope.is_neox)
    return y
