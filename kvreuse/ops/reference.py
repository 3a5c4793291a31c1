"""Plain-PyTorch reference of the relocation operator: the CPU path and every kernel's oracle.

Math is fp32 for 16-bit inputs and fp64 for fp32/fp64 inputs (so that an fp32 cache stays
within the rounding of its own dtype), with a single rounding back to the input dtype.  The
table values themselves are always the engine's fp32 cos/sin.
"""

from __future__ import annotations

import torch

from kvreuse.rope.spec import RopeSpec


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate each rotary pair of `x` by the angle whose cos/sin are given.

    x: `[..., num_tokens, num_heads, rotary_dim]` (float); cos, sin: `[num_tokens, rotary_dim // 2]`,
    of x's dtype.  out: where to write (like x, of its dtype; may be a strided view), else a new tensor.
    NeoX pairs channel i with i + d/2; GPT-J pairs 2i with 2i + 1.
    """
    c = cos.unsqueeze(-2).to(x.dtype)  # [N, 1, half]
    s = sin.unsqueeze(-2).to(x.dtype)
    out = torch.empty_like(x) if out is None else out
    if is_neox:
        (x1, x2), (o1, o2) = x.chunk(2, dim=-1), out.chunk(2, dim=-1)
    else:
        x1, x2, o1, o2 = x[..., 0::2], x[..., 1::2], out[..., 0::2], out[..., 1::2]
    # o1 = x1 c - x2 s, o2 = x2 c + x1 s, one rounding per op (no fused multiply-add, as the kernels)
    torch.mul(x1, c, out=o1)
    t = x2 * s
    o1.sub_(t)
    torch.mul(x2, c, out=o2)
    torch.mul(x1, s, out=t)
    o2.add_(t)
    return out


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
        # rounded to table_dtype: the engine rotates 16-bit keys with its table rounded to that dtype
        c, s = rope.table_rows(pos, table_dtype)
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
                       delta_k: torch.Tensor | None = None, *, table: tuple[torch.Tensor, torch.Tensor] | None = None,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """Move post-RoPE keys from `src_pos` to `dst_pos` (optionally adding a same-frame residue first).

    k: `[..., num_tokens, num_kv_heads, head_dim]`; delta_k: broadcastable to k, any float dtype.
    table: `delta_cos_sin(rope, src_pos, dst_pos, compute_dtype(k.dtype), source_table_dtype(k.dtype))`
    when the caller has it already (one table serves every layer of a load).
    out: a tensor shaped like k to write into: of k's dtype, or of the compute dtype (then nothing is
    rounded here: the caller rounds once, when it stores the keys).
    Returns `out`, or a new tensor of k's dtype; channels outside the rotary slice are copied unchanged.
    """
    ct = compute_dtype(k.dtype)
    if table is None:
        table = delta_cos_sin(rope, src_pos.to(k.device), dst_pos.to(k.device), ct, source_table_dtype(k.dtype))
    cos, sin = table
    lo, hi = rope.rot_offset, rope.rot_offset + rope.rotary_dim
    x = k.to(ct)
    if delta_k is not None:
        x = x + delta_k.to(ct)
    y = out if out is not None and out.dtype == ct else torch.empty(k.shape, dtype=ct, device=k.device)
    if lo > 0:
        y[..., :lo] = x[..., :lo]
    if hi < k.shape[-1]:
        y[..., hi:] = x[..., hi:]
    rotate_pairs(x[..., lo:hi], cos.to(ct), sin.to(ct), rope.is_neox, out=y[..., lo:hi])
    if out is None:
        return y.to(k.dtype)
    if y is not out:
        out.copy_(y)
    return out


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
