"""Launchers of the CUDA extension `kvreuse._C` over the packed description in `kvreuse.ops.plan`.

The CUDA kernel reads the rotation from the fp32 delta table only (angles="kernel" falls back to
building the table here), and needs the per-layer offsets' alignment from the host (checking it
on the device side would cost a device-to-host copy per call).
"""

from __future__ import annotations

import math

import torch

from kvreuse.ops import backends, plan


def _align(dest: plan.Dest) -> int:
    return math.gcd(*dest.host_offsets) or 16


def relocate_scatter(k, v, dest: plan.Dest, ang: plan.Angles, rope, fk, fv) -> None:
    """k, v: `[L, N, H, D]` (v may be None); see `plan` for the other arguments."""
    ext = backends.cuda_ext()
    if not ang.use_table:
        raise ValueError("the CUDA kernel reads the delta cos/sin table: call with angles='table'")
    fa = (fk.a_base, fk.a_off, fk.b_base, fk.b_off, fk.ranks) if fk is not None else (None,) * 5
    fb = (fv.a_base, fv.a_off, fv.b_base, fv.b_off, fv.ranks) if fv is not None else (None,) * 5
    ext.relocate_scatter(k, v, dest.base, dest.layer_off, dest.s_kv, dest.s_blk, dest.s_off, dest.s_h,
                         dest.block_size, dest.num_slots, dest.slots, ang.cos, ang.sin, rope.rot_offset,
                         rope.rotary_dim, rope.is_neox, *fa, *fb, _align(dest))


def gather(dest: plan.Dest, k_out: torch.Tensor, v_out: torch.Tensor | None) -> None:
    """k_out, v_out: `[L, N, H, D]` (v_out None: K only, MLA)."""
    backends.cuda_ext().gather(dest.base, dest.layer_off, dest.s_kv, dest.s_blk, dest.s_off, dest.s_h,
                               dest.slots, dest.block_size, k_out, v_out, _align(dest))
