"""Model level: KV encoded at offset p and relocated to p' matches KV encoded directly at p'.

Tiny random HF models (Llama, Qwen2, Qwen2-VL text path with M-RoPE, DeepSeek-V2 with MLA's
latent cache).  The bar is bf16 noise: the relocated bf16 KV must be no farther from the fp32
encoding at p' than 1.5x the bf16 encoding at p' is.  In fp32 relocation is exact to ~1e-6.
"""

from __future__ import annotations

import copy

import pytest
import torch

from kvreuse import relocate
from kvreuse.reference import ReferenceEncoder

tf = pytest.importorskip("transformers")

COMMON = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=32768)


def _llama():
    return tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2, **COMMON))


def _qwen2():
    return tf.Qwen2ForCausalLM(tf.Qwen2Config(num_key_value_heads=2, rope_theta=1e6, **COMMON))


def _qwen2_vl():
    text = dict(COMMON, num_key_value_heads=2, model_type="qwen2_vl_text",
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]})
    cfg = tf.Qwen2VLConfig(text_config=text, vision_config=dict(depth=1, embed_dim=32, hidden_size=128, num_heads=2,
                                                                 mlp_ratio=2, patch_size=14, spatial_merge_size=2))
    return tf.Qwen2VLForConditionalGeneration(cfg)


def _deepseek_v2():
    cfg = tf.DeepseekV2Config(vocab_size=256, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=64,
                              q_lora_rank=None, qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=32,
                              n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=3,
                              max_position_embeddings=32768)
    return tf.DeepseekV2ForCausalLM(cfg)


MODELS = {"llama": _llama, "qwen2": _qwen2, "qwen2_vl": _qwen2_vl, "deepseek_v2_mla": _deepseek_v2}


def _dist(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).norm().item()


def _to_bf16_keeping_rope_buffers(model: torch.nn.Module) -> torch.nn.Module:
    """`.to(bf16)` also rounds the rotary `inv_freq` buffers, which `from_pretrained(dtype=bf16)`
    keeps in fp32; restore them so the bf16 model rotates like a served bf16 checkpoint."""
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    src = dict(model.named_buffers())
    for name, buf in bf16.named_buffers():
        if "inv_freq" in name:
            buf.data = src[name].detach().clone()
    return bf16


@pytest.fixture(scope="module", params=list(MODELS))
def encoders(request):
    torch.manual_seed(1)
    fp32 = MODELS[request.param]().float().eval()
    bf16 = _to_bf16_keeping_rope_buffers(fp32)
    return request.param, ReferenceEncoder(fp32), ReferenceEncoder(bf16)


@pytest.mark.parametrize("p,p2", [(0, 5000), (3000, 17), (100, 30000)])
def test_relocated_kv_matches_direct_encoding(encoders, p, p2):
    name, enc32, enc16 = encoders
    torch.manual_seed(p + p2)
    tokens = torch.randint(0, 256, (48,))
    if enc32.mrope:
        assert enc32.rope.mrope_section == (4, 6, 6)
    if enc32.mla:
        assert enc32.rope.rot_offset == 64 and not enc32.rope.is_neox
    at_p16 = enc16.encode(tokens, start=p)
    direct16 = enc16.encode(tokens, start=p2)
    direct32 = enc32.encode(tokens, start=p2)
    moved16 = relocate(at_p16.k, at_p16.positions, direct16.positions, enc16.rope)
    noise = _dist(direct16.k, direct32.k)
    err = _dist(moved16, direct32.k)
    assert err <= 1.5 * noise, f"{name}: relocated bf16 error {err:.4g} > 1.5x bf16 noise {noise:.4g}"
    # values do not depend on position beyond fp noise, and relocation leaves them alone
    assert _dist(at_p16.v, direct32.v) <= 1.5 * _dist(direct16.v, direct32.v) + 1e-6
    # fp32 model: relocation reproduces the direct encoding to fp32 accuracy
    at_p32 = enc32.encode(tokens, start=p)
    moved32 = relocate(at_p32.k, at_p32.positions, direct32.positions, enc32.rope)
    rel32 = _dist(moved32, direct32.k) / direct32.k.double().norm().item()
    assert rel32 < 1e-5, f"{name}: fp32 relative error {rel32:.3g}"
