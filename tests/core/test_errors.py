"""Bad input raises a clear error at the boundary."""

from __future__ import annotations

import pytest
import torch

from kvreuse import Patch, RopeSpec, UnsupportedRope, fit_patch, relocate, relocate_and_patch

SPEC = RopeSpec.from_hf_config({"hidden_size": 256, "num_attention_heads": 4, "max_position_embeddings": 4096})


def test_positions_out_of_range():
    k = torch.randn(4, 2, 64)
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 4096\)"):
        relocate(k, torch.arange(4), torch.arange(4) + 4094, SPEC)
    with pytest.raises(ValueError, match="positions must lie"):
        relocate(k, torch.arange(4) - 2, torch.arange(4), SPEC)


def test_positions_shape_and_dtype():
    k = torch.randn(4, 2, 64)
    with pytest.raises(ValueError, match="covers 3 tokens but k has 4"):
        relocate(k, torch.arange(3), torch.arange(3), SPEC)
    with pytest.raises(TypeError, match="integer tensor"):
        relocate(k, torch.arange(4.0), torch.arange(4), SPEC)
    with pytest.raises(ValueError, match="without mrope_section"):
        relocate(k, torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 4, dtype=torch.long), SPEC)


def test_bad_key_tensors():
    with pytest.raises(TypeError, match="float16/bfloat16/float32/float64"):
        relocate(torch.zeros(4, 2, 64, dtype=torch.int32), torch.arange(4), torch.arange(4), SPEC)
    with pytest.raises(ValueError, match="smaller than the rotary slice"):
        relocate(torch.randn(4, 2, 32), torch.arange(4), torch.arange(4), SPEC)
    with pytest.raises(ValueError, match=r"\[num_tokens, num_kv_heads, head_dim\]"):
        relocate(torch.randn(4, 64), torch.arange(4), torch.arange(4), SPEC)


def test_mismatched_k_v_and_patch():
    k = torch.randn(2, 4, 2, 64)
    with pytest.raises(ValueError, match="must agree"):
        relocate_and_patch(k, torch.randn(2, 5, 2, 64), torch.arange(4), torch.arange(4), SPEC)
    with pytest.raises(ValueError, match="must agree"):
        relocate_and_patch(k, k.bfloat16(), torch.arange(4), torch.arange(4), SPEC)
    patch = fit_patch(torch.randn(2, 3, 2, 64), torch.randn(2, 3, 2, 64), max_rank=2)
    with pytest.raises(ValueError, match="patch is for k of shape"):
        relocate_and_patch(k, k.clone(), torch.arange(4), torch.arange(4), SPEC, patch)
    with pytest.raises(TypeError, match="same dtype"):
        fit_patch(torch.randn(2, 3, 2, 8), torch.randn(2, 3, 2, 8).double())
    with pytest.raises(ValueError, match="same shape"):
        fit_patch(torch.randn(2, 3, 2, 8), torch.randn(2, 4, 2, 8))
    with pytest.raises(ValueError, match="energy"):
        fit_patch(torch.randn(2, 3, 2, 8), torch.randn(2, 3, 2, 8), energy=1.5)
    assert isinstance(patch, Patch)


@pytest.mark.parametrize("params,match", [
    ({"rope_type": "dynamic", "factor": 2.0}, "dynamic NTK"),
    ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}, "LongRoPE"),
    ({"rope_type": "made_up"}, "not known"),
    ({"rope_type": "linear", "factor": [2.0, 4.0]}, "several factors"),
])
def test_unsupported_rope_raises(params, match):
    cfg = {"hidden_size": 256, "num_attention_heads": 4, "max_position_embeddings": 4096,
           "rope_parameters": {"rope_theta": 10000.0, **params}}
    with pytest.raises(UnsupportedRope, match=match):
        RopeSpec.from_hf_config(cfg)


def test_legacy_rope_scaling_keys_are_read():
    cfg = {"hidden_size": 256, "num_attention_heads": 4, "max_position_embeddings": 4096, "rope_theta": 10000.0,
           "rope_scaling": {"type": "dynamic", "factor": 2.0}}
    with pytest.raises(UnsupportedRope):
        RopeSpec.from_hf_config(cfg)


def test_import_does_not_pull_vllm():
    import subprocess
    import sys

    code = "import sys, kvreuse; assert 'vllm' not in sys.modules and 'triton' not in sys.modules, sorted(m for m in sys.modules if m.startswith(('vllm','triton')))"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_hf_config_variants():
    """Config shapes seen in the wild: explicit rotary_dim (GPT-J), rotary_pct, per-layer-type RoPE, MLA."""
    gptj = RopeSpec.from_hf_config({"model_type": "gptj", "n_embd": 4096, "hidden_size": 4096,
                                    "num_attention_heads": 16, "rotary_dim": 64, "max_position_embeddings": 2048})
    assert gptj.rotary_dim == 64 and not gptj.is_neox
    neox = RopeSpec.from_hf_config({"model_type": "gpt_neox", "hidden_size": 2048, "num_attention_heads": 16,
                                    "rotary_pct": 0.25, "max_position_embeddings": 2048})
    assert neox.rotary_dim == 32 and neox.is_neox
    per_type = {"hidden_size": 1024, "num_attention_heads": 4, "head_dim": 256, "max_position_embeddings": 8192,
                "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}}
    with pytest.raises(UnsupportedRope, match="per layer type"):
        RopeSpec.from_hf_config(per_type)
    full = RopeSpec.from_hf_config(per_type, layer_type="full_attention")
    assert full.position_divisor == 8.0 and full.base == 1e6
    assert RopeSpec.from_hf_config(per_type, layer_type="sliding_attention").base == 1e4
    mla = RopeSpec.from_hf_config({"model_type": "deepseek_v3", "hidden_size": 1024, "num_attention_heads": 8,
                                   "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
                                   "rope_interleave": True, "max_position_embeddings": 4096})
    assert mla.rot_offset == 512 and mla.rotary_dim == 64 and not mla.is_neox
