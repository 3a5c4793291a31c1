"""Plain-PyTorch references of the fused paged operators, composed from the existing references.

`relocate_patch_scatter_reference` = `relocate_and_patch` then `scatter_kv` per layer;
`gather_paged_reference` = `gather_kv` per layer.  They are the CPU path (CPU_ATTN included) and
the oracle of the Triton and CUDA kernels.
"""

from __future__ import annotations

import torch

from kvreuse.paged import PagedSpec, gather_kv, scatter_kv


def relocate_patch_scatter_reference(k: torch.Tensor, v: torch.Tensor, src_pos: torch.Tensor,
                                     dst_pos: torch.Tensor, rope, caches: list[torch.Tensor],
                                     spec: PagedSpec, slot_mapping: torch.Tensor, patch=None) -> None:
    """k, v: `[L, N, H, D]`; caches: L tensors; patch: `Patch` of L layers or None.

    Slots < 0 (vLLM's padding) are skipped, as the kernels do.
    """
    from kvreuse.patch import relocate_and_patch  # kvreuse.patch imports kvreuse.ops

    k2, v2 = relocate_and_patch(k, v, src_pos, dst_pos, rope, patch)    # [L, N, H, D] each
    slots = slot_mapping.to(k.device).long()
    keep = slots >= 0
    if not bool(keep.all()):
        k2, v2, slots = k2[:, keep], v2[:, keep], slots[keep]
    for layer, cache in enumerate(caches):
        scatter_kv(cache, spec, k2[layer], v2[layer], slots)


def gather_paged_reference(caches: list[torch.Tensor], spec: PagedSpec,
                           slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Read `(k, v)`, each `[L, N, H, D]`, out of L caches at `slot_mapping: [N]`."""
    ks, vs = zip(*(gather_kv(c, spec, slot_mapping) for c in caches))
    return torch.stack(ks), torch.stack(vs)
