"""Algebraic properties of relocation and patches (no vLLM needed)."""

from __future__ import annotations

import pytest
import torch

from kvreuse import RopeSpec, fit_patch, relocate, relocate_and_patch
from kvreuse.ops.reference import apply_rope_reference

SPECS = {
    "neox": RopeSpec.from_hf_config({"hidden_size": 384, "num_attention_heads": 4, "rope_theta": 1e6,
                                     "max_position_embeddings": 262144}),
    "gptj-partial": RopeSpec.from_hf_config({"hidden_size": 320, "num_attention_heads": 4, "model_type": "gptj",
                                             "partial_rotary_factor": 0.5, "max_position_embeddings": 262144}),
    "mrope": RopeSpec.from_hf_config({"hidden_size": 512, "num_attention_heads": 4, "max_position_embeddings": 65536,
                                      "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                                          "mrope_section": [16, 24, 24]}}),
    "mla": RopeSpec.from_hf_config({"hidden_size": 256, "num_attention_heads": 4, "kv_lora_rank": 64,
                                    "qk_rope_head_dim": 32, "qk_nope_head_dim": 32, "model_type": "deepseek_v2",
                                    "max_position_embeddings": 262144}),
}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _keys(spec: RopeSpec, n: int, heads: int, dtype, start: int):
    d = spec.rot_offset + spec.rotary_dim + (16 if spec.rot_offset == 0 and spec.rotary_dim < 96 else 0)
    d = max(d, spec.rotary_dim + spec.rot_offset)
    pos = torch.arange(start, start + n)
    if spec.mrope_section is not None:
        pos = torch.stack([pos, pos + 3, pos + 7])
    k = apply_rope_reference(torch.randn(n, heads, d), pos, spec).to(dtype)
    return k, pos


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(SPECS))
def test_zero_shift_is_identity(name, dtype):
    spec = SPECS[name]
    k, pos = _keys(spec, 33, 3, dtype, 4321)
    assert torch.equal(relocate(k, pos, pos, spec), k)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("d", [1, 77, 100_000, -4000])
def test_shift_and_back_returns_input_within_one_rounding(name, dtype, d):
    spec = SPECS[name]
    k, pos = _keys(spec, 65, 5, dtype, 5000)
    back = relocate(relocate(k, pos, pos + d, spec), pos + d, pos, spec)
    # "one rounding": one ulp at the magnitude of the rotary pair each element lives in (the
    # first rotation's rounding error is spread over both elements of the pair by the second)
    eps = torch.finfo(dtype).eps
    lo, hi = spec.rot_offset, spec.rot_offset + spec.rotary_dim
    x = k.double()[..., lo:hi]
    if spec.is_neox:
        x1, x2 = x.chunk(2, -1)
        norm = (x1.square() + x2.square()).sqrt().repeat(1, 1, 2)
    else:
        norm = (x[..., 0::2].square() + x[..., 1::2].square()).sqrt().repeat_interleave(2, -1)
    ulp = eps * torch.exp2(torch.floor(torch.log2(norm.clamp_min(1e-30))))
    err = (back.double()[..., lo:hi] - x).abs()
    assert torch.all(err <= ulp), f"max error {float((err / ulp).max()):.2f} ulp of the pair magnitude"
    # channels outside the rotary slice are untouched
    assert torch.equal(back[..., :lo], k[..., :lo]) and torch.equal(back[..., hi:], k[..., hi:])


def test_relocation_composes():
    spec = SPECS["neox"]
    k, pos = _keys(spec, 40, 2, torch.float32, 10)
    one = relocate(k, pos, pos + 1000, spec)
    two = relocate(relocate(k, pos, pos + 300, spec), pos + 300, pos + 1000, spec)
    assert torch.allclose(one, two, atol=1e-5, rtol=1e-5)


def test_layer_stacked_input_equals_per_layer():
    spec = SPECS["gptj-partial"]
    k = torch.randn(3, 20, 2, 80, dtype=torch.bfloat16)
    src, dst = torch.arange(20), torch.arange(20) + 999
    stacked = relocate(k, src, dst, spec)
    assert torch.equal(stacked, torch.stack([relocate(k[i], src, dst, spec) for i in range(3)]))


def test_values_never_move_without_patch():
    spec = SPECS["neox"]
    k = torch.randn(2, 10, 2, 96)
    v = torch.randn(2, 10, 2, 96)
    k2, v2 = relocate_and_patch(k, v, torch.arange(10), torch.arange(10) + 5, spec)
    assert v2 is v
    assert torch.equal(k2, relocate(k, torch.arange(10), torch.arange(10) + 5, spec))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_relocate_and_patch_rotates_the_patched_keys(dtype):
    """K' = R(Δp)(K + A_k B_k): the patch is added in the source frame, then everything moves."""
    spec = SPECS["neox"]
    k = torch.randn(2, 24, 2, 96).to(dtype)
    v = torch.randn(2, 24, 2, 96).to(dtype)
    dk, dv = 0.1 * torch.randn(2, 24, 2, 96), 0.1 * torch.randn(2, 24, 2, 96)
    patch = fit_patch(dk, dv, energy=1.0, max_rank=96, budget=None, dtype=torch.float32)
    src, dst = torch.arange(24) + 50, torch.arange(24) + 9000
    k2, v2 = relocate_and_patch(k, v, src, dst, spec, patch)
    want_k = relocate((k.double() + dk.double()).float(), src, dst, spec)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.05, rtol=0.02)
    assert torch.allclose(k2.float(), want_k.float(), **tol)
    assert torch.allclose(v2.float(), (v.float() + dv), **tol)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16], ids=str)
def test_table_rows_are_the_rows_computed_alone(dtype):
    """The cached table (grown as higher positions are asked for) holds each row's own bits."""
    spec = RopeSpec.from_hf_config({"hidden_size": 256, "num_attention_heads": 4, "rope_theta": 1e6,
                                    "max_position_embeddings": 40000, "rope_scaling": {"rope_type": "yarn",
                                    "factor": 4.0, "original_max_position_embeddings": 8192}})
    g = torch.Generator().manual_seed(0)
    for hi in (100, 3000, spec.max_position, 700):   # grows twice, capped at max_position, then reads inside
        pos = torch.randint(0, hi, (257,), generator=g)
        c, s = spec.cos_sin(pos, with_mscale=True)
        want = (c, s) if dtype is None else (c.to(dtype), s.to(dtype))
        got = spec.table_rows(pos, dtype)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    with pytest.raises(ValueError, match="positions"):
        spec.table_rows(torch.tensor([spec.max_position]))
