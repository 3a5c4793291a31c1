"""The relocation operator, its fused paged form, the save-side gather, and their dispatch.

Three implementations sit behind each call: the PyTorch reference (CPU path and oracle), a Triton
kernel (`kvreuse.kernels.relocate`) and a CUDA kernel (`kvreuse._C`, built where CUDA is present).
`backend=` (or the `KVREUSE_OPS_BACKEND` environment variable, read per call) forces one; `auto`
picks CUDA, then Triton, for CUDA tensors and the reference otherwise (see `kvreuse.ops.backends`).

    relocate(k, src, dst, rope)                                   -> k'          (dense)
    place(cache, layout, k, v, src, dst, slots, rope, patch)                     (load: writes the cache)
    gather(cache, layout, slots)                                  -> (k, v)      (save side)

`layout` is the cache's `kvreuse.layout.PagedLayout`, derived from vLLM 0.32's own cache views.
"""

from __future__ import annotations

import torch

from kvreuse.ops import backends
from kvreuse.ops.reference import relocate_reference
from kvreuse.ops.validate import check_kv, check_positions_pair
from kvreuse.layout import PagedLayout, Reading
from kvreuse.rope.spec import RopeSpec

__all__ = ["gather", "place", "relocate"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ANGLE_MODES = ("table", "kernel")


def relocate(k: torch.Tensor, src_pos: torch.Tensor, dst_pos: torch.Tensor, rope: RopeSpec, *,
             backend: str | None = None, angles: str = "table") -> torch.Tensor:
    """Return post-RoPE keys computed at `src_pos` as they would be at `dst_pos`.

    Args:
        k: `[num_tokens, num_kv_heads, head_dim]` (or `[num_layers, num_tokens, ...]`), float16,
            bfloat16, float32 or float64, rotated by `rope`'s table at `src_pos`.
        src_pos, dst_pos: integer `[num_tokens]`, or `[3, num_tokens]` for M-RoPE.
        rope: the model's `RopeSpec`.
        backend: "reference" | "triton" | "cuda" | None (auto / `KVREUSE_OPS_BACKEND`).
        angles: kernels only — "table" reads the fp32 delta cos/sin table built by the reference
            (bit-equal to it), "kernel" recomputes it in-kernel from positions and `inv_freq`
            (Triton only; the CUDA kernel always reads the table).

    Returns:
        A new tensor like `k`.  Math is fp32 with one rounding; values (V) never move, so there is
        no V argument.  Channels outside the rotary slice are copied bit for bit.
    """
    check_kv("k", k, rope)
    src_pos, dst_pos = check_positions_pair(rope, src_pos, dst_pos, k.shape[-3])
    name = backends.choose(k.device, backend, kernel_ok=k.dtype in _KERNEL_DTYPES)
    if name == "reference":
        return relocate_reference(k, src_pos, dst_pos, rope)
    from kvreuse.ops import plan

    k4 = k if k.dim() == 4 else k.unsqueeze(0)
    out = torch.empty(k4.shape, dtype=k.dtype, device=k.device)
    _launch(name, k4, None, plan.dense_dest(out), _angles(rope, src_pos, dst_pos, k.device, angles, k.dtype, name),
            rope, None, None)
    return out if k.dim() == 4 else out[0]


def place(kv_cache: torch.Tensor | list[torch.Tensor], layout: PagedLayout, k: torch.Tensor, v: torch.Tensor | None,
          src_pos: torch.Tensor, dst_pos: torch.Tensor, slot_mapping: torch.Tensor, rope: RopeSpec, patch=None, *,
          patch_layer: int | None = None, backend: str | None = None, angles: str = "table",
          validate: bool = True) -> None:
    """Place a chunk's KV into vLLM's paged cache: `K' = R(Δp)(K + A_k B_k)`, `V' = V + A_v B_v`.

    The serving path of a load: on CUDA tensors the fused kernel (CUDA where `kvreuse._C` is built,
    else Triton) reads K, V and the factors once, rotates in fp32, adds the patch, rounds once and
    writes straight into the cache through the slot mapping, addressing `layout`'s strides; on CPU
    (and for CPU_ATTN's transposed keys) the PyTorch reference does the same.

    Args:
        kv_cache: one layer's `[B, H, N, C]` cache view (3-D k) or a list of `num_layers` of them (4-D k).
        layout: the caches' `PagedLayout` (`kvreuse.layout`).
        k, v: `[num_tokens, H, head_size]` for one layer, or `[num_layers, num_tokens, H, head_size]`.
            MLA caches have no V: pass None (or a 0-wide tensor).
        src_pos, dst_pos: integer `[num_tokens]` (or `[3, num_tokens]` for M-RoPE).
        slot_mapping: `[num_tokens]` int32/int64 slots; negative slots (vLLM's padding) are skipped.
        patch: a `Patch` over `num_layers` layers, or None.  With 3-D k, a one-layer patch or a
            multi-layer one with `patch_layer` naming the layer.  MLA: only its K factors apply.
        backend, angles: as in `relocate`.
        validate: check the slot range on the host (one device sync).  The kernels never write
            outside the cache either way: out-of-range slots are dropped there.
    """
    if not layout.has_v:
        if v is not None and v.shape[-1] != 0:
            raise ValueError(f"a {layout.reading.value} cache holds no V, got v {list(v.shape)}")
        v = None
    k4, v4, caches, patch = _as_layers(k, v, kv_cache, patch, patch_layer, rope)
    src_pos, dst_pos = check_positions_pair(rope, src_pos, dst_pos, k4.shape[1])
    for c in caches:
        layout.check(c)
    if tuple(k4.shape[2:]) != (layout.num_heads, layout.head_size):
        raise ValueError(f"k {list(k4.shape)} does not match the cache's [*, *, {layout.num_heads}, "
                         f"{layout.head_size}]")
    if slot_mapping.shape != (k4.shape[1],) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int32/int64 [{k4.shape[1]}], got {slot_mapping.dtype} "
                         f"{list(slot_mapping.shape)}")
    if validate and slot_mapping.numel() and int(slot_mapping.max()) >= layout.num_slots:
        raise ValueError(f"slot_mapping entries must lie in [-1, {layout.num_slots}); "
                         f"got max {int(slot_mapping.max())}")
    kernel_ok = (layout.kernel_strides() is not None and k4.dtype in _KERNEL_DTYPES
                 and layout.dtype in _KERNEL_DTYPES)
    name = backends.choose(k4.device, backend, kernel_ok=kernel_ok)
    if name == "reference":
        from kvreuse.ops.paged_reference import place_reference

        place_reference(caches, layout, k4, v4, src_pos, dst_pos, slot_mapping, rope, patch)
        return
    from kvreuse.ops import plan

    dest = plan.paged_dest(caches, layout, slot_mapping.to(k4.device))
    fk = plan.factor_pack(patch.k, k4.device) if patch is not None else None
    fv = plan.factor_pack(patch.v, k4.device) if patch is not None and v4 is not None else None
    _launch(name, k4, v4, dest, _angles(rope, src_pos, dst_pos, k4.device, angles, k4.dtype, name), rope, fk, fv)


def gather(kv_cache: torch.Tensor | list[torch.Tensor], layout: PagedLayout, slot_mapping: torch.Tensor, *,
           backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy a chunk's KV out of the paged cache into contiguous tensors (the save side).

    Fused on CUDA tensors (one launch for all layers), the reference elsewhere.

    Args:
        kv_cache: one layer's cache view, or a list of layers' views (all with `layout`).
        slot_mapping: `[num_tokens]` int32/int64 slots, all in `[0, num_slots)`.

    Returns:
        `(k, v)`, each `[num_tokens, H, head_size]` (one cache) or `[num_layers, num_tokens, H, head_size]`
        (a list), in the cache's dtype.  MLA caches have no V: `v` is then 0-wide.
    """
    single = isinstance(kv_cache, torch.Tensor)
    caches = [kv_cache] if single else list(kv_cache)
    if not caches:
        raise ValueError("gather needs at least one cache")
    for c in caches:
        layout.check(c)
    if slot_mapping.dim() != 1 or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be a 1-D int32/int64 tensor, got {slot_mapping.dtype} "
                         f"{list(slot_mapping.shape)}")
    if slot_mapping.numel() and (int(slot_mapping.min()) < 0 or int(slot_mapping.max()) >= layout.num_slots):
        raise ValueError(f"slot_mapping entries must lie in [0, {layout.num_slots})")
    kernel_ok = layout.kernel_strides() is not None and layout.dtype in _KERNEL_DTYPES
    name = backends.choose(caches[0].device, backend, kernel_ok=kernel_ok)
    if name == "reference" and caches[0].device.type == "cpu" and layout.reading in (Reading.CPU_ATTN,
                                                                                     Reading.CPU_ATTN_AMX):
        from kvreuse.paged import gather_cpu_pages

        k, v = gather_cpu_pages(caches, layout, slot_mapping)  # the page read in place, all layers at once
    elif name == "reference":
        from kvreuse.ops.paged_reference import gather_reference

        k, v = gather_reference(caches, layout, slot_mapping)
    else:
        from kvreuse.ops import plan

        shape = (len(caches), slot_mapping.numel(), layout.num_heads, layout.head_size)
        k = torch.empty(shape, dtype=layout.dtype, device=caches[0].device)
        v = torch.empty_like(k) if layout.has_v else k.new_empty(shape[:3] + (0,))
        dest = plan.paged_dest(caches, layout, slot_mapping.to(k.device))
        if name == "triton":
            backends.triton_kernels().launch_gather(dest, k, v if layout.has_v else None)
        else:
            from kvreuse.ops import cuda

            cuda.gather(dest, k, v if layout.has_v else None)
    return (k[0], v[0]) if single else (k, v)


# ---------------------------------------------------------------------------------------------- internals
def _as_layers(k, v, kv_cache, patch, patch_layer, rope):
    """Normalize one-layer and all-layer calls to `[L, N, H, D]` inputs on the caches' device, L caches,
    an L-layer patch.  v may be None (MLA)."""
    from kvreuse.patch import Patch

    check_kv("k", k, rope)
    if v is not None:
        check_kv("v", v)
        if k.shape[:-1] != v.shape[:-1] or k.dtype != v.dtype or k.device != v.device:
            raise ValueError(f"k {list(k.shape)} {k.dtype} {k.device} and v {list(v.shape)} {v.dtype} {v.device} "
                             "must agree in tokens, heads, dtype and device")
    if k.dim() == 3:
        if not isinstance(kv_cache, torch.Tensor):
            raise TypeError("a one-layer call ([num_tokens, H, D] k) takes one cache tensor")
        caches = [kv_cache]
        if patch is not None:
            if patch_layer is not None:
                patch = Patch([patch.k[patch_layer]], [patch.v[patch_layer]], patch.num_tokens,
                              patch.num_kv_heads, patch.head_dim)
            elif patch.num_layers != 1:
                raise ValueError(f"patch has {patch.num_layers} layers: pass patch_layer= for a one-layer call")
        k, v = k.unsqueeze(0), (v.unsqueeze(0) if v is not None else None)
    else:
        if isinstance(kv_cache, torch.Tensor):
            raise TypeError("an all-layer call ([L, N, H, D] k) takes a list of L cache tensors")
        caches = list(kv_cache)
        if len(caches) != k.shape[0]:
            raise ValueError(f"k has {k.shape[0]} layers but {len(caches)} caches were given")
        if patch_layer is not None:
            raise ValueError("patch_layer is for one-layer calls")
    if patch is not None:
        patch._check_target(k, v if v is not None else k)
    dev = caches[0].device
    for c in caches:
        if c.device != dev:
            raise ValueError(f"caches on {c.device} and {dev}")
    if k.device != dev:   # a chunk fetched to the host tier: one copy to the cache's device
        k, v = k.to(dev, non_blocking=True), (v.to(dev, non_blocking=True) if v is not None else None)
    return k, v, caches, patch


def _angles(rope, src_pos, dst_pos, device, mode, dtype, name):
    from kvreuse.ops import plan

    if mode not in ANGLE_MODES:
        raise ValueError(f"angles must be one of {ANGLE_MODES}, got {mode!r}")
    return plan.angles(rope, src_pos, dst_pos, device, table=mode == "table" or name == "cuda", dtype=dtype)


def _launch(name, k4, v4, dest, ang, rope, fk, fv) -> None:
    if name == "triton":
        backends.triton_kernels().launch_relocate_scatter(k4, v4, dest, ang, rope, fk, fv)
    else:
        from kvreuse.ops import cuda

        cuda.relocate_scatter(k4, v4, dest, ang, rope, fk, fv)
