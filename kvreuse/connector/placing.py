"""Writing one step's loads into vLLM's paged cache, a layer at a time: the CPU path and the device path.

Both take a `Job` (one request's chunks of the step, concatenated, each with its destination slots)
and one layer: `place_layer(job, layer, cache, write)` relocates that layer's keys from the entry's
positions to the request's and writes K and V through the slot mapping.  `placer_for` picks the path
for a job and a cache; the worker knows nothing else of either.

  CpuPlacer  on CPU caches: every layer of a job shares one plan built at its first layer (the delta
             rotation table, the items' KV concatenated once, the slot runs), and each layer is
             relocated in token tiles small enough to stay on the calling thread (`_SERIAL_ELEMENTS`);
             the AMX-tiled page is written by vLLM's own cache write (`write`).
  DevicePlacer  elsewhere: the fused relocate + scatter operator (`kvreuse.ops.place`: CUDA or Triton
             kernel on GPU, the PyTorch reference otherwise), straight into the layer's cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kvreuse.layout import PagedLayout, Reading
from kvreuse.ops import place
from kvreuse.ops.reference import compute_dtype, delta_cos_sin, relocate_reference, source_table_dtype
from kvreuse.ops.validate import check_positions_pair
from kvreuse.paged import scatter_kv_runs, slot_runs
from kvreuse.rope.spec import RopeSpec

# vLLM's own cache write for a layer: (k, v, cache, slots), k and v `[T, H, D]` in the cache's dtype
CacheWriter = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]

_SERIAL_ELEMENTS = 32768  # PyTorch runs an op on at most this many elements on the calling thread (GRAIN_SIZE)
_MAX_TILES = 8            # a CPU load of more tokens than this many serial tiles is relocated a layer at a time


@dataclass
class _CpuPlan:
    """What every layer of a CPU load shares, built at its first layer.

    A layer's keys are relocated into `out`; for CPU_ATTN (keys stored transposed, Kᵀ `[D, N]` per
    block and head) with tokens innermost, so that every op runs along contiguous tokens and each
    block run's write is a plain strided copy.
    """

    table: tuple[torch.Tensor, torch.Tensor]  # the delta rotation's cos, sin: [N, rotary_dim // 2]
    runs: list[tuple[int, int, int, int]]     # the slots as runs inside kernel blocks (`slot_runs`)
    tiles: list[slice]                        # token ranges relocated op by op (see `_SERIAL_ELEMENTS`)
    k: torch.Tensor                           # every item's keys, all layers: [L, N, H, D] ([L, H, D, N] CPU_ATTN)
    v: torch.Tensor | None                    # [L, N, H, D] (None for MLA)
    out: torch.Tensor                         # [N, H, D] view, compute dtype (the cache rounds it once)


@dataclass
class Job:
    """One layer-independent placement: the chunks of one request's load, concatenated (each item
    with its own destination slots)."""

    k: list[torch.Tensor]  # per item: [num_layers, n_i, H, D] (entry frame)
    v: list[torch.Tensor]
    src_pos: torch.Tensor  # [N], or [3, N] for M-RoPE
    dst_pos: torch.Tensor  # [N], or [3, N] for M-RoPE
    slots: torch.Tensor    # [N]
    cpu: _CpuPlan | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.slots.numel())


class CpuPlacer:
    def __init__(self, rope: RopeSpec, spec: PagedLayout, vllm_writes: bool) -> None:
        """`vllm_writes`: every layer is written by vLLM's own cache write (the AMX page), so no slot runs."""
        self.rope, self.spec, self.vllm_writes = rope, spec, vllm_writes

    @staticmethod
    def accepts(job: Job, cache: torch.Tensor) -> bool:
        return cache.device.type == "cpu" and len({x.shape[0] for x in job.k}) == 1

    def place_layer(self, job: Job, layer: int, cache: torch.Tensor, write: CacheWriter | None) -> None:
        plan = job.cpu or self._plan(job)
        # CPU_ATTN: [H, D, N], read as [N, H, D]
        k = plan.k[layer].permute(2, 0, 1) if self.spec.reading is Reading.CPU_ATTN else plan.k[layer]
        for t in plan.tiles:
            relocate_reference(k[t], job.src_pos, job.dst_pos, self.rope, out=plan.out[t],
                               table=(plan.table[0][t], plan.table[1][t]))
        v = plan.v[layer] if plan.v is not None else None
        if write is not None:
            write(plan.out.to(cache.dtype), v.to(cache.dtype), cache, job.slots)
        else:
            scatter_kv_runs(cache, self.spec, plan.out, v, plan.runs)

    def _plan(self, job: Job) -> _CpuPlan:
        """Shared by every layer of a CPU load: the rotation table, the slot runs, and the items' KV
        concatenated once for all layers (one copy a load; per item and layer it was ~100 small ops a
        layer).  Each op on more than `_SERIAL_ELEMENTS` elements would wake PyTorch's OpenMP team,
        which costs more than a small op itself (~0.1 ms on a 2-core VM with the other core idle,
        dozens of ops a load): a layer is relocated in token tiles under that size and written in runs
        no longer than a tile, so that it runs on the calling thread; a load of more than `_MAX_TILES`
        tiles runs in whole-layer ops, big enough for the team to pay off."""
        src, dst = check_positions_pair(self.rope, job.src_pos, job.dst_pos, job.num_tokens)
        dtype = job.k[0].dtype
        ct = compute_dtype(dtype)
        table = delta_cos_sin(self.rope, src, dst, ct, source_table_dtype(dtype))  # [N, rotary_dim // 2]
        n, (h, d) = job.num_tokens, job.k[0].shape[2:]
        tile = max(1, _SERIAL_ELEMENTS // (h * d))
        if n > _MAX_TILES * tile:
            tile = n
        tiles = [slice(t, t + tile) for t in range(0, n, tile)]
        if self.spec.reading is Reading.CPU_ATTN:  # tokens innermost, as the transposed keys are written
            k = torch.cat([x.permute(0, 2, 3, 1) for x in job.k], dim=-1)
        else:
            k = torch.cat(job.k, dim=1)
        v = torch.cat(job.v, dim=1) if self.spec.has_v else None
        runs = [] if self.vllm_writes else \
            [(b, o + a, t + a, min(tile, m - a)) for b, o, t, m in slot_runs(self.spec, job.slots)
             for a in range(0, m, tile)]
        if self.spec.reading is Reading.CPU_ATTN:
            table = tuple(t.t().contiguous().t() for t in table)
            out = torch.empty(h, d, n, dtype=ct).permute(2, 0, 1)
        else:
            out = torch.empty(n, h, d, dtype=ct)
        job.cpu = _CpuPlan(table, runs, tiles, k, v, out)
        return job.cpu


class DevicePlacer:
    def __init__(self, rope: RopeSpec, spec: PagedLayout) -> None:
        self.rope, self.spec = rope, spec

    def place_layer(self, job: Job, layer: int, cache: torch.Tensor, write: CacheWriter | None) -> None:
        k = torch.cat([x[layer] for x in job.k])  # [N, H, D]
        v = torch.cat([x[layer] for x in job.v]) if self.spec.has_v else None
        place(cache, self.spec, k, v, job.src_pos, job.dst_pos, job.slots, self.rope)


class Placers:
    """Both paths for one set of layers; `for_job` picks one per job and cache."""

    def __init__(self, rope: RopeSpec, spec: PagedLayout, vllm_writes: bool) -> None:
        self.cpu, self.device = CpuPlacer(rope, spec, vllm_writes), DevicePlacer(rope, spec)

    def for_job(self, job: Job, cache: torch.Tensor) -> CpuPlacer | DevicePlacer:
        return self.cpu if CpuPlacer.accepts(job, cache) else self.device
