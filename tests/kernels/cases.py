"""Shared inputs and comparisons for the kernel tests (CPU interpreter and GPU)."""

from __future__ import annotations

import torch

from kvreuse.layout import PagedLayout, Reading, allocate
from kvreuse.patch import Factors, Patch
from kvreuse.rope import freqs
from kvreuse.rope.spec import RopeSpec

MANTISSA = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}
MIN_EXP = {torch.bfloat16: -126, torch.float16: -14, torch.float32: -126}

# name -> (head_dim, RopeSpec kwargs)
ROPES = {
    "neox": (128, dict(rotary_dim=128)),
    "gptj": (128, dict(rotary_dim=128, is_neox=False)),
    "neox-partial": (80, dict(rotary_dim=32, rot_offset=16)),
    "gptj-partial": (96, dict(rotary_dim=48, is_neox=False, rot_offset=8)),
    "neox-linear": (96, dict(rotary_dim=96, position_divisor=4.0)),
    "mrope": (128, dict(rotary_dim=128, mrope_section=(16, 24, 24))),
    "mrope-interleaved": (128, dict(rotary_dim=128, mrope_section=(24, 20, 20), mrope_interleaved=True)),
    "mla-kpe": (576, dict(rotary_dim=64, is_neox=False, rot_offset=512)),
}


def make_rope(name: str) -> tuple[int, RopeSpec]:
    head_dim, kw = ROPES[name]
    rd = kw["rotary_dim"]
    return head_dim, RopeSpec(inv_freq=freqs.default_inv_freq(10000.0, rd), **kw)


def positions(rope: RopeSpec, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random src/dst (M-RoPE: [3, n]); a few tokens do not move, to check the exact identity."""
    shape = (3, n) if rope.mrope_section else (n,)
    src = torch.randint(0, 100_000, shape, generator=gen)
    dst = torch.randint(0, 100_000, shape, generator=gen)
    dst[..., :2] = src[..., :2]
    return src, dst


def random_patch(num_layers: int, n: int, h: int, d: int, rank: int, dtype, gen, device) -> Patch:
    """A patch whose layers have ranks rank, 0 (None), rank // 2 + 1, ... with zero-padded heads.

    rank 0: every layer carries explicit empty factors (`a: [n, h, 0]`), not None.
    """
    def fac(l):
        if rank == 0:
            return Factors(torch.zeros(n, h, 0, dtype=dtype, device=device),
                           torch.zeros(h, 0, d, dtype=dtype, device=device), (0,) * h)
        r = [rank, 0, rank // 2 + 1][l % 3]
        if r == 0:
            return None
        ranks = tuple(max(1, r - (i % 2)) for i in range(h))
        a = torch.randn(n, h, r, generator=gen) * 0.3
        b = torch.randn(h, r, d, generator=gen) * 0.3
        for i, ri in enumerate(ranks):
            a[:, i, ri:] = 0
            b[i, ri:] = 0
        return Factors(a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype), ranks)
    return Patch([fac(l) for l in range(num_layers)], [fac(l + 1) for l in range(num_layers)], n, h, d)


def make_caches(kv_layout: str, num_layers: int, num_blocks: int, block_size: int, h: int, d: int, dtype, device,
                reading: Reading = Reading.KV_SPLIT) -> tuple[list[torch.Tensor], PagedLayout]:
    """NaN-filled per-layer views over one allocation, strided as vLLM 0.32 does for `kv_layout`."""
    return allocate(kv_layout, reading, num_layers=num_layers, num_blocks=num_blocks, num_heads=h,
                    block_size=block_size, head_size=d, dtype=dtype, device=device)


def assert_close_rounding(actual: torch.Tensor, expected: torch.Tensor, what: str = "", flips: bool = False) -> None:
    """Equal NaN pattern, and finite entries within one rounding (ulp) of the output dtype.

    flips: in-kernel cos/sin differ from PyTorch's by an fp32 ulp, which now and then lands the
    16-bit-rounded source table row on the other side of a rounding boundary; that moves a few
    entries by up to 2^-8 of the tensor's scale.  Allow that for at most 0.5% of the entries.
    """
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    na, ne = actual.isnan(), expected.isnan()
    assert torch.equal(na, ne), f"{what}: {int((na != ne).sum())} entries differ in NaN-ness (unwritten/stray slots)"
    a, e = actual[~na].double(), expected[~ne].double()
    mag = torch.maximum(a.abs(), e.abs()).clamp_min(2.0 ** MIN_EXP[actual.dtype])
    ulp = 2.0 ** (torch.floor(torch.log2(mag)) - MANTISSA[actual.dtype])
    # fp32 math on operands of the tensor's scale: a result that cancels to near zero keeps the
    # operands' absolute error, which may exceed its own ulp
    floor = 2.0 ** -21 * float(e.abs().max()) if e.numel() else 0.0
    bad = (a - e).abs() > torch.clamp(ulp, min=floor)
    if flips and int(bad.sum()) <= max(1, a.numel() // 200):
        bad = bad & ((a - e).abs() > 2.0 ** -8 * float(e.abs().max()))
    assert not bool(bad.any()), (f"{what}: {int(bad.sum())}/{a.numel()} entries beyond one rounding, "
                                 f"max abs diff {float((a - e).abs().max()):.3g}")


def assert_bitwise(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    same = (actual == expected) | (actual.isnan() & expected.isnan())
    assert bool(same.all()), f"{what}: {int((~same).sum())} entries differ"
