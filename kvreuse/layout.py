"""vLLM 0.32's paged KV cache, as kvreuse addresses it: one description for every backend.

What vLLM does (read from its source, `vllm/v1/worker/utils.py: allocate_kv_cache` and
`vllm/v1/kv_cache_interface.py: create_kv_cache_views`): all layers' pages live in one int8
allocation; each layer gets a view of logical shape `[B, H, N, C]` (blocks, head slots, tokens per
kernel block, content), whose physical stride order is the model-wide `KVCacheLayout`
(`LBNHC`, `LBHNC`, `BLHNC`, ... : a permutation of `[L, B, H, N, C]`, `C` always innermost).  When a
backend needs smaller blocks than the scheduler's, every scheduler block is split into
`block_size // N` kernel blocks that sit one page apart, so `slot // N` is still the kernel block
of `slot = block_id * block_size + offset`.  Backends read `C` in one of three ways:

  * ``KV_SPLIT`` — FLASH_ATTN, TRITON_ATTN, FLASHINFER: `kv_cache.transpose(1, 2).split(D, -1)`,
    i.e. `C = [K (D) | V (D)]` for each (block, head, token).
  * ``CPU_ATTN`` — vLLM's CPU backend (`LBHNC` only): the `[N, 2D]` bytes of a (block, head) are
    the block's keys transposed, `Kᵀ [D, N]`, then its values `[N, D]`.
  * ``CPU_ATTN_AMX`` — vLLM's CPU backend where it picks its AMX kernels (bf16 KV, block size a
    multiple of 32, on CPUs with AMX tiles): each (block, head) page holds the keys in tiles of 16
    tokens, pairs of dims innermost (`[N/16, D/2, 16, 2]`), then the values in tiles of 16 dims,
    pairs of tokens innermost (`[D/16, N/2, 16, 2]`), as its `cpu_attn_reshape_and_cache` writes
    them with `isa="amx"`.  The worker checks this against vLLM's own op at startup.
  * ``MLA`` — MLA backends: `H = 1`, `C = [kv_c (kv_lora_rank) | k_pe (rope dim)]`; no V.  kvreuse
    treats the whole latent as K with one head; RoPE covers the `k_pe` tail.

`PagedLayout.views` turns any of them into K and V views indexable as `[block, offset, head, dim]`
(the plain-PyTorch path); `kernel_strides` gives the fused kernels' address model.  A cache
kvreuse cannot address (quantized KV, an unknown backend) is refused by `check_addressable` with a
message naming the backend and the dtype.  Nothing here imports vLLM: the GPU check runs without it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from kvreuse.errors import KVReuseError


class Reading(enum.Enum):
    """How an attention backend reads the content axis `C` of a layer's `[B, H, N, C]` view."""

    KV_SPLIT = "kv_split"
    CPU_ATTN = "cpu_attn"
    CPU_ATTN_AMX = "cpu_attn_amx"
    MLA = "mla"


BACKENDS: dict[str, Reading] = {
    "FLASH_ATTN": Reading.KV_SPLIT,
    "TRITON_ATTN": Reading.KV_SPLIT,
    "FLASHINFER": Reading.KV_SPLIT,
    "CPU_ATTN": Reading.CPU_ATTN,
    "TRITON_MLA": Reading.MLA,
    "FLASH_ATTN_MLA": Reading.MLA,
    "FLASHMLA": Reading.MLA,
    "CUTLASS_MLA": Reading.MLA,
    "FLASHINFER_MLA": Reading.MLA,
    "CPU_MLA": Reading.MLA,
}

# vLLM's KVCacheLayout members: physical order of the logical axes [L, B, H, N, C]
# (vllm/v1/kv_cache_layout.py; copied as data so the GPU check needs no vLLM).
KV_CACHE_LAYOUTS: dict[str, tuple[int, ...]] = {
    "LBHNC": (0, 1, 2, 3, 4),
    "LBNHC": (0, 1, 3, 2, 4),
    "LHBNC": (0, 2, 1, 3, 4),
    "BLHNC": (1, 0, 2, 3, 4),
    "BLNHC": (1, 0, 3, 2, 4),
    "BHLNC": (1, 2, 0, 3, 4),
}
# kv_cache_dtype strings that store the model's own float values (vLLM's non-quantized names)
PLAIN_CACHE_DTYPES = ("auto", "float16", "bfloat16", "float32", "half", "float")
ADDRESSABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class PagedLayout:
    """One layer's paged cache: the `[B, H, N, C]` view's geometry and how its backend reads `C`.

    `block_size` is the scheduler's block (slots are `block_id * block_size + offset`);
    `kernel_block_size` is the view's `N` (smaller when vLLM splits blocks).  `strides` are the
    view's element strides.  Layers of one KV cache group share a layout up to their base pointer.
    """

    reading: Reading
    num_blocks: int            # B: kernel blocks in the view
    num_heads: int             # H: KV heads (1 for MLA)
    kernel_block_size: int     # N
    head_size: int             # K width per head (MLA: the whole latent, kv_lora_rank + rope dim)
    head_size_v: int           # V width (0 for MLA)
    strides: tuple[int, int, int, int]
    dtype: torch.dtype
    block_size: int = 0        # scheduler block; 0 = kernel_block_size
    backend: str = ""
    kv_layout: str | None = None   # KVCacheLayout name, where known
    group: int = 0                 # KV cache group id

    def __post_init__(self) -> None:
        if self.block_size == 0:
            object.__setattr__(self, "block_size", self.kernel_block_size)
        if self.block_size % self.kernel_block_size:
            raise ValueError(f"block size {self.block_size} is not a multiple of the kernel block size "
                             f"{self.kernel_block_size}")

    # ------------------------------------------------------------------ geometry
    @property
    def content(self) -> int:
        """C: elements per (block, head, token) cell."""
        return self.head_size + self.head_size_v

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.num_blocks, self.num_heads, self.kernel_block_size, self.content)

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.kernel_block_size

    @property
    def has_v(self) -> bool:
        return self.head_size_v > 0

    def check(self, cache: torch.Tensor, what: str = "cache") -> None:
        """Raise unless `cache` is a view this layout describes (shape, strides, dtype)."""
        if tuple(cache.shape) != self.shape or tuple(cache.stride()) != self.strides or cache.dtype != self.dtype:
            raise ValueError(f"{what} {list(cache.shape)} strides {cache.stride()} {cache.dtype} does not match "
                             f"the layout's {list(self.shape)} strides {self.strides} {self.dtype}")

    # ------------------------------------------------------------------ addressing
    def views(self, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """K and V of a layer's cache as views indexable `[block, offset, head, dim]` (V None for MLA).

        Writing through them writes the cache: this is the plain-PyTorch reading of each backend.
        """
        self.check(cache)
        s_b, s_h, s_n, s_c = self.strides
        base = cache.storage_offset()
        size_k = (self.num_blocks, self.kernel_block_size, self.num_heads, self.head_size)
        if self.reading is Reading.CPU_ATTN:
            n, d = self.kernel_block_size, self.head_size
            k = cache.as_strided(size_k, (s_b, 1, s_h, n), base)                 # Kᵀ [D, N] per (block, head)
            v = cache.as_strided(size_k, (s_b, d, s_h, 1), base + n * d)         # then V [N, D]
            return k, v
        if self.reading is Reading.CPU_ATTN_AMX:
            raise ValueError("CPU_ATTN_AMX tiles tokens: address it through `tiled_views`")
        k = cache.as_strided(size_k, (s_b, s_n, s_h, s_c), base)
        if not self.has_v:
            return k, None
        size_v = size_k[:3] + (self.head_size_v,)
        return k, cache.as_strided(size_v, (s_b, s_n, s_h, s_c), base + self.head_size * s_c)

    def tiled_views(self, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CPU_ATTN_AMX: K as `[block, N/16, 16, head, D/2, 2]` and V as `[block, N/2, 2, head, D/16, 16]` views.

        Token `off` of K is `[off // 16, off % 16]`, dim `d` is `[d // 2, d % 2]`; of V, token `off` is
        `[off // 2, off % 2]` and dim `d` is `[d // 16, d % 16]`.
        """
        assert self.reading is Reading.CPU_ATTN_AMX
        self.check(cache)
        s_b, s_h, _, _ = self.strides
        n, d, base = self.kernel_block_size, self.head_size, cache.storage_offset()
        k = cache.as_strided((self.num_blocks, n // 16, 16, self.num_heads, d // 2, 2),
                             (s_b, 16 * d, 2, s_h, 32, 1), base)
        v = cache.as_strided((self.num_blocks, n // 2, 2, self.num_heads, d // 16, 16),
                             (s_b, 32, 1, s_h, 16 * n, 2), base + n * d)
        return k, v

    def kernel_strides(self) -> tuple[int, int, int, int] | None:
        """`(s_kv, s_blk, s_off, s_h)` of the fused kernels' address model, or None where it does not apply.

        A kernel writes element `d` of token slot `(blk, off)`, head `h` at
        `base + blk * s_blk + off * s_off + h * s_h + d`, and V's at `+ s_kv`.  That needs a
        contiguous head dim and V shaped like K: true of KV_SPLIT (V = K + D) and MLA (no V), not of
        CPU_ATTN's transposed keys.
        """
        s_b, s_h, s_n, s_c = self.strides
        if self.reading in (Reading.CPU_ATTN, Reading.CPU_ATTN_AMX) or s_c != 1:
            return None
        if self.has_v and self.head_size_v != self.head_size:
            return None
        return self.head_size, s_b, s_n, s_h

    def split_slots(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(kernel block, offset)` of each slot (`[T]` int64 each), checked to lie in the cache."""
        slots = slots.long()
        if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= self.num_slots):
            raise ValueError(f"slot_mapping entries must lie in [0, {self.num_slots}); got "
                             f"[{int(slots.min())}, {int(slots.max())}]")
        return slots // self.kernel_block_size, slots % self.kernel_block_size


# ---------------------------------------------------------------------------------------------- derivation
def reading_of(backend: str | None, kv_dtype: object) -> Reading:
    """The reading of `backend`'s cache; an unknown backend is refused (named, with the dtype)."""
    name = (backend or "").upper()
    if name not in BACKENDS:
        raise KVReuseError(f"kvreuse cannot address the KV cache of attention backend {backend!r} "
                           f"(KV dtype {kv_dtype}); supported backends: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name]


def check_addressable(backend: str | None, kv_cache_dtype: str | None, tensor_dtype: torch.dtype) -> Reading:
    """Refuse, at startup, a cache whose values kvreuse cannot read or write exactly.

    `kv_cache_dtype` is vLLM's `--kv-cache-dtype` string; quantized caches (fp8*, int8/int4 per
    token-head, nvfp4, turboquant, ...) hold scaled codes that relocation would have to requantize.
    """
    cache_dtype = str(kv_cache_dtype or "auto")
    if cache_dtype not in PLAIN_CACHE_DTYPES or tensor_dtype not in ADDRESSABLE_DTYPES:
        raise KVReuseError(f"kvreuse cannot address a quantized KV cache: backend {backend!r}, KV dtype "
                           f"{cache_dtype!r} (tensor {tensor_dtype}); serve with --kv-cache-dtype auto "
                           f"(float16, bfloat16 or float32 KV)")
    return reading_of(backend, f"{cache_dtype!r}, tensor {tensor_dtype}")


def physical_order(strides: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """Axes of a view from outermost to innermost by stride (size-1 axes go last)."""
    return tuple(sorted(range(len(strides)), key=lambda i: (shape[i] > 1, strides[i]), reverse=True))


def check_kv_layout(cache: torch.Tensor, kv_layout: str) -> None:
    """The view's physical order must be `kv_layout`'s order of `[B, H, N, C]` (vLLM's layer_view_order)."""
    if kv_layout not in KV_CACHE_LAYOUTS:
        raise KVReuseError(f"unknown KV cache layout {kv_layout!r}; vLLM 0.32 has {sorted(KV_CACHE_LAYOUTS)}")
    want = tuple(i - 1 for i in KV_CACHE_LAYOUTS[kv_layout] if i != 0)
    got = physical_order(tuple(cache.stride()), tuple(cache.shape))
    multi = [i for i in want if cache.shape[i] > 1]
    if [i for i in got if cache.shape[i] > 1] != multi:
        raise KVReuseError(f"cache strides {cache.stride()} (shape {list(cache.shape)}) are not KV cache "
                           f"layout {kv_layout}")


def from_vllm_view(cache: torch.Tensor, backend: str | None, *, num_kv_heads: int, head_size: int,
                   block_size: int | None = None, kv_cache_dtype: str | None = "auto",
                   kv_layout: str | None = None, group: int = 0, isa: str | None = None) -> PagedLayout:
    """The layout of one layer's vLLM 0.32 cache view `[B, H, N, C]`, checked against the model.

    head_size: the model's per-head size (MLA: `kv_lora_rank + qk_rope_head_dim`, vLLM's head size
    for MLA); block_size: the scheduler's block size (default: the view's `N`); isa: the CPU
    backend's kernel family for this layer (`layer.isa`: "amx" tiles the page, see `Reading`).
    """
    reading = check_addressable(backend, kv_cache_dtype, cache.dtype)
    if reading is Reading.CPU_ATTN and isa == "amx":
        reading = Reading.CPU_ATTN_AMX
        if cache.shape[2] % 32 or head_size % 16:
            raise KVReuseError(f"backend 'CPU_ATTN' (isa amx): block size {cache.shape[2]} / head size {head_size} "
                               "are not multiples of 32 / 16, which its tiles need")
    if cache.dim() != 4:
        raise KVReuseError(f"backend {backend!r}: expected vLLM 0.32's per-layer [blocks, heads, block_size, C] "
                           f"cache view, got shape {list(cache.shape)}")
    b, h, n, c = cache.shape
    if kv_layout is not None:
        check_kv_layout(cache, kv_layout)
    if cache.stride(3) != 1:
        raise KVReuseError(f"backend {backend!r}: the content axis of the cache is not contiguous "
                           f"(strides {cache.stride()})")
    if reading is Reading.MLA:
        want_h, want_c, hv = 1, head_size, 0
    else:
        want_h, want_c, hv = num_kv_heads, 2 * head_size, head_size
    if (h, c) != (want_h, want_c):
        raise KVReuseError(f"backend {backend!r}: cache view [B, H, N, C] = {list(cache.shape)} does not hold "
                           f"{want_h} head(s) of C = {want_c} (head size {head_size}, KV dtype {cache.dtype})")
    if reading in (Reading.CPU_ATTN, Reading.CPU_ATTN_AMX) and cache.stride(2) != c:
        raise KVReuseError(f"backend 'CPU_ATTN': a (block, head) page must be contiguous, strides {cache.stride()}")
    return PagedLayout(reading, b, h, n, head_size, hv, tuple(cache.stride()), cache.dtype,
                       block_size or n, (backend or "").upper(), kv_layout, group)


def layouts_from_kv_cache_config(kv_caches: dict[str, torch.Tensor], kv_cache_config, backends: dict[str, str],
                                 *, kv_cache_dtype: str | None, kv_layout: str | None,
                                 isas: dict[str, str] | None = None) -> dict[str, PagedLayout]:
    """Every layer's layout from vLLM's `KVCacheConfig` (groups, their block size and head geometry).

    backends: layer name -> attention backend name; isas: layer name -> CPU kernel family.  Layers
    of a group without per-layer views (Mamba states, raw buffers) are refused: kvreuse places
    attention KV only.
    """
    group_of: dict[str, tuple[int, object]] = {}
    for gid, group in enumerate(kv_cache_config.kv_cache_groups):
        for name in group.layer_names:
            group_of[name] = (gid, group.kv_cache_spec)
    out = {}
    for name, cache in kv_caches.items():
        if name not in group_of:
            raise KVReuseError(f"layer {name!r} is in no KV cache group")
        gid, spec = group_of[name]
        per_layer = getattr(spec, "kv_cache_specs", None)          # UniformTypeKVCacheSpecs
        if isinstance(per_layer, dict):
            spec = per_layer[name]
        if not hasattr(spec, "num_kv_heads") or not hasattr(spec, "head_size"):
            raise KVReuseError(f"layer {name!r}: KV cache group {gid} holds {type(spec).__name__} state, "
                               "which kvreuse cannot place")
        out[name] = from_vllm_view(cache, backends.get(name), num_kv_heads=spec.num_kv_heads,
                                   head_size=spec.head_size, block_size=spec.block_size,
                                   kv_cache_dtype=kv_cache_dtype, kv_layout=kv_layout, group=gid,
                                   isa=(isas or {}).get(name))
    return out


def allocate(kv_layout: str, reading: Reading, *, num_layers: int, num_blocks: int, num_heads: int,
             block_size: int, head_size: int, dtype: torch.dtype, device: str | torch.device = "cpu",
             backend: str = "") -> tuple[list[torch.Tensor], PagedLayout]:
    """Per-layer `[B, H, N, C]` views over one allocation with vLLM 0.32's strides for `kv_layout`.

    The same stride rule as vLLM's `compute_layout_strides` (no page padding, no block split), for
    benchmarks and GPU checks on hosts without vLLM; the tests check it against vLLM's own.
    Returns the views (filled with NaN, so unwritten slots show) and their layout.
    """
    h = 1 if reading is Reading.MLA else num_heads
    c = head_size if reading is Reading.MLA else 2 * head_size
    shape = (num_layers, num_blocks, h, block_size, c)
    strides, step = [0] * 5, 1
    for dim in reversed(KV_CACHE_LAYOUTS[kv_layout]):
        strides[dim] = step
        step *= shape[dim]
    buf = torch.full((step,), float("nan"), dtype=dtype, device=device)
    view = buf.as_strided(shape, strides)
    views = [view[i] for i in range(num_layers)]
    layout = PagedLayout(reading, num_blocks, h, block_size, head_size, 0 if reading is Reading.MLA else head_size,
                         tuple(views[0].stride()), dtype, block_size, backend, kv_layout)
    return views, layout
