"""Plain-PyTorch references of the fused paged operators, composed from the existing references.

`place_reference` = `relocate_and_patch` then `scatter_kv` per layer; `gather_reference` =
`gather_kv` per layer.  They are the CPU path (CPU_ATTN included) and the oracle of the Triton and
CUDA kernels, for every `PagedLayout` reading.
"""

from __future__ import annotations

import torch

from kvreuse.layout import PagedLayout
from kvreuse.ops.reference import compute_dtype, relocate_reference
from kvreuse.paged import gather_kv, scatter_kv


def place_reference(caches: list[torch.Tensor], layout: PagedLayout, k: torch.Tensor, v: torch.Tensor | None,
                    src_pos: torch.Tensor, dst_pos: torch.Tensor, slot_mapping: torch.Tensor, rope,
                    patch=None) -> None:
    """k, v: `[L, N, H, D]` (v None for MLA); caches: L views; patch: `Patch` of L layers or None.

    Slots < 0 (vLLM's padding) are skipped, as the kernels do.
    """
    from kvreuse.patch import relocate_and_patch  # kvreuse.patch imports kvreuse.ops

    if v is not None:
        k2, v2 = relocate_and_patch(k, v, src_pos, dst_pos, rope, patch)    # [L, N, H, D] each
    else:   # MLA: the latent is K; only K factors apply
        dk = None
        if patch is not None:
            ct = compute_dtype(k.dtype)
            dk = torch.stack([f.dense(ct) if f is not None else torch.zeros(k.shape[1:], dtype=ct, device=k.device)
                              for f in patch.k])
        k2, v2 = relocate_reference(k, src_pos.to(k.device), dst_pos.to(k.device), rope, delta_k=dk), None
    slots = slot_mapping.to(k.device).long()
    keep = slots >= 0
    if not bool(keep.all()):
        k2, slots = k2[:, keep], slots[keep]
        v2 = v2[:, keep] if v2 is not None else None
    for layer, cache in enumerate(caches):
        scatter_kv(cache, layout, k2[layer], v2[layer] if v2 is not None else None, slots)


def gather_reference(caches: list[torch.Tensor], layout: PagedLayout,
                     slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Read `(k, v)`, each `[L, N, H, D]` (v 0-wide for MLA), out of L caches at `slot_mapping: [N]`."""
    ks, vs = zip(*(gather_kv(c, layout, slot_mapping) for c in caches))
    return torch.stack(ks), torch.stack(vs)
