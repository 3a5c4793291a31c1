"""Conditioning patches: rank-0 identity, monotone error in rank, full-rank exactness, bytes."""

from __future__ import annotations

import pytest
import torch

from kvreuse import Patch, fit_patch


def _lowrank_delta(layers=3, n=48, heads=2, d=32, rank=6, noise=1e-3):
    a = torch.randn(layers, n, heads, rank)
    b = torch.randn(layers, heads, rank, d)
    return torch.einsum("lnhr,lhrd->lnhd", a, b) + noise * torch.randn(layers, n, heads, d)


def _err(patch: Patch, dk, dv) -> float:
    zk, zv = torch.zeros_like(dk), torch.zeros_like(dv)
    pk, pv = patch.apply(zk, zv)
    return ((pk - dk).norm() ** 2 + (pv - dv).norm() ** 2).sqrt().item() / (dk.norm() ** 2 + dv.norm() ** 2).sqrt().item()


def test_rank_zero_is_identity():
    dk, dv = _lowrank_delta(), _lowrank_delta()
    patch = fit_patch(dk, dv, max_rank=0)
    assert patch.nbytes == 0 and all(f is None for f in patch.k + patch.v)
    k, v = torch.randn_like(dk).bfloat16(), torch.randn_like(dv).bfloat16()
    k2, v2 = patch.apply(k, v)
    assert torch.equal(k2, k) and torch.equal(v2, v)


def test_error_falls_monotonically_with_rank():
    dk, dv = _lowrank_delta(rank=12, noise=0.05), _lowrank_delta(rank=12, noise=0.05)
    errs = [_err(fit_patch(dk, dv, energy=1.0, max_rank=r, budget=None), dk, dv) for r in (0, 1, 2, 4, 8, 16, 32)]
    assert all(b <= a + 1e-9 for a, b in zip(errs, errs[1:])), errs
    assert errs[0] == pytest.approx(1.0) and errs[-1] < 1e-5


def test_energy_grows_with_rank_and_energy_picks_rank():
    dk, dv = _lowrank_delta(rank=4, noise=1e-4), _lowrank_delta(rank=4, noise=1e-4)
    patch = fit_patch(dk, dv, energy=0.99, max_rank=16, budget=None)
    ranks = patch.ranks()
    assert int(ranks.max()) <= 4 and int(ranks.min()) >= 1      # 4 directions hold > 99% of energy
    assert _err(patch, dk, dv) < 0.1
    capped = fit_patch(dk, dv, energy=0.99, max_rank=2, budget=None)
    assert int(capped.ranks().max()) == 2


def test_full_rank_reproduces_in_context_kv_to_fp32_precision():
    layers, n, heads, d = 2, 40, 3, 24
    base_k, base_v = torch.randn(layers, n, heads, d), torch.randn(layers, n, heads, d)
    ctx_k = base_k + 0.3 * torch.randn_like(base_k)
    ctx_v = base_v + 0.3 * torch.randn_like(base_v)
    patch = fit_patch(ctx_k - base_k, ctx_v - base_v, energy=1.0, max_rank=d, budget=None)
    k, v = patch.apply(base_k, base_v)
    assert torch.allclose(k, ctx_k, atol=1e-5, rtol=1e-5) and torch.allclose(v, ctx_v, atol=1e-5, rtol=1e-5)


def test_negligible_layers_carry_no_factors():
    base_k, base_v = torch.randn(3, 32, 2, 16), torch.randn(3, 32, 2, 16)
    dk = torch.zeros_like(base_k)
    dk[2] = 0.5 * torch.randn(32, 2, 16)
    dk[1] = 1e-6 * torch.randn(32, 2, 16)                     # far below 1e-3 of the base
    patch = fit_patch(dk, torch.zeros_like(base_v), base_k=base_k, base_v=base_v)
    assert patch.k[0] is None and patch.k[1] is None and patch.k[2] is not None
    assert all(f is None for f in patch.v)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_nbytes_is_exact(dtype):
    dk, dv = _lowrank_delta(layers=4, n=50, heads=3, d=40, rank=5, noise=0.01), _lowrank_delta(layers=4, n=50, heads=3, d=40)
    dk[1] = 0
    patch = fit_patch(dk, dv, energy=0.999, max_rank=7, budget=None, dtype=dtype)
    expect = 0
    for f in patch.k + patch.v:
        if f is not None:
            r = f.a.shape[-1]
            assert f.a.shape == (50, 3, r) and f.b.shape == (3, r, 40) and f.a.dtype == dtype
            expect += (50 * 3 * r + 3 * r * 40) * torch.finfo(dtype).bits // 8
    assert patch.k[1] is None
    assert patch.nbytes == expect
    restored = Patch.from_state_dict(patch.state_dict())
    assert restored.nbytes == patch.nbytes and torch.equal(restored.ranks(), patch.ranks())
    for f, g in zip(patch.k + patch.v, restored.k + restored.v):
        assert (f is None) == (g is None) and (f is None or (torch.equal(f.a, g.a) and torch.equal(f.b, g.b)))


def test_slice_tokens_matches_full_patch():
    dk, dv = _lowrank_delta(), _lowrank_delta()
    patch = fit_patch(dk, dv, energy=1.0, max_rank=8, budget=None)
    zk = torch.zeros_like(dk)
    full_k, _ = patch.apply(zk, zk)
    part_k, _ = patch.slice_tokens(10, 30).apply(zk[:, 10:30], zk[:, 10:30])
    assert torch.equal(part_k, full_k[:, 10:30])


@pytest.mark.parametrize("budget", [0.0, 0.01, 0.05, 0.2])
def test_budget_caps_bytes_and_spends_them_where_the_residue_is(budget):
    """The byte budget is never exceeded, and it goes to the layer with the largest relative residue."""
    layers, n, heads, d = 4, 64, 2, 32
    base_k, base_v = torch.randn(layers, n, heads, d), torch.randn(layers, n, heads, d)
    dk = 0.01 * _lowrank_delta(layers, n, heads, d, rank=4)
    dv = 0.01 * _lowrank_delta(layers, n, heads, d, rank=4)
    dv[3] *= 50                                     # the deep layer's V carries most of the residue
    patch = fit_patch(dk, dv, base_k=base_k, base_v=base_v, budget=budget, dtype=torch.bfloat16)
    kv_bytes = 2 * layers * n * heads * d * 2
    assert patch.nbytes <= budget * kv_bytes
    if budget == 0.0:
        assert patch.nbytes == 0
    elif budget >= 0.01:
        assert patch.v[3] is not None
        ranks = patch.ranks()
        per_layer_kind = ranks.sum(-1)                          # [layers, 2]
        assert int(per_layer_kind[3, 1]) == int(per_layer_kind.max())
    big = fit_patch(dk, dv, base_k=base_k, base_v=base_v, budget=None)
    assert patch.nbytes <= big.nbytes * 2  # (bf16 vs fp32 factors) never more than the unbudgeted ranks


def test_budget_keeps_error_falling_as_it_grows():
    base_k, base_v = torch.randn(3, 48, 2, 32), torch.randn(3, 48, 2, 32)
    dk, dv = 0.2 * _lowrank_delta(rank=8, noise=0.01), 0.2 * _lowrank_delta(rank=8, noise=0.01)
    errs = [_err(fit_patch(dk, dv, base_k=base_k, base_v=base_v, budget=b, energy=1.0), dk, dv)
            for b in (0.0, 0.02, 0.05, 0.1, 0.3)]
    assert all(b <= a + 1e-9 for a, b in zip(errs, errs[1:])), errs
