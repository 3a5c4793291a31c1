"""The relocation operator and its dispatch.

Three implementations sit behind one call: the PyTorch reference (CPU path and oracle), a Triton
kernel (GPU default) and a CUDA kernel (fastest, built where CUDA is present).  `backend=` (or
the `KVREUSE_OPS_BACKEND` environment variable, read per call) forces one; tests use it.
"""

from __future__ import annotations

import torch

from kvreuse.ops.validate import check_kv, check_positions_pair
from kvreuse.ops.reference import relocate_reference
from kvreuse.rope.spec import RopeSpec

__all__ = ["relocate"]


def relocate(k: torch.Tensor, src_pos: torch.Tensor, dst_pos: torch.Tensor, rope: RopeSpec) -> torch.Tensor:
    """Return post-RoPE keys computed at `src_pos` as they would be at `dst_pos`.

    Args:
        k: `[num_tokens, num_kv_heads, head_dim]` (or `[num_layers, num_tokens, ...]`), float16,
            bfloat16, float32 or float64, rotated by `rope`'s table at `src_pos`.
        src_pos, dst_pos: integer `[num_tokens]`, or `[3, num_tokens]` for M-RoPE.
        rope: the model's `RopeSpec`.

    Returns:
        A new tensor like `k`.  Math is fp32 with one rounding; values (V) never move, so there is
        no V argument.  Channels outside the rotary slice are copied bit for bit.
    """
    check_kv("k", k, rope)
    src_pos, dst_pos = check_positions_pair(rope, src_pos, dst_pos, k.shape[-3])
    return relocate_reference(k, src_pos, dst_pos, rope)
