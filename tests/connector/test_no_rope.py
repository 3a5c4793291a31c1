"""Models whose KV cannot be moved (no RoPE, or a RoPE that depends on the prompt's length): served at fidelity
"exact" only, where KV is placed at the positions it was computed at; a looser fidelity is refused at startup."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
import transformers

from kvreuse.connector.connector import rope_for_model
from kvreuse.connector.segmented_cls import SCHEDULER_CLS
from kvreuse.errors import KVReuseError
from kvreuse.models import TinySpec, build_tiny_model, tiny_words
from connector_helpers import Server, assert_same, free_port, running_pair, vllm_argv


def _model_config(hf):
    return SimpleNamespace(hf_text_config=hf, get_head_size=lambda: hf.hidden_size // hf.num_attention_heads)


OPT = transformers.OPTConfig(hidden_size=64, num_attention_heads=2, num_hidden_layers=2, ffn_dim=128)
DYNAMIC = transformers.LlamaConfig(hidden_size=64, num_attention_heads=2, rope_scaling={"rope_type": "dynamic",
                                                                                        "factor": 2.0})


@pytest.mark.parametrize("hf", [OPT, DYNAMIC], ids=["opt", "dynamic-ntk"])
def test_unmovable_positions_serve_exact_and_refuse_looser_fidelity(hf):
    rope = rope_for_model(_model_config(hf), "exact")
    assert rope.rotary_dim == 32 and torch.count_nonzero(rope.inv_freq) == 0   # every rotation is the identity
    for fidelity in ("accurate", "fast"):
        with pytest.raises(KVReuseError, match=f"policy.fidelity '{fidelity}' places KV at new positions"):
            rope_for_model(_model_config(hf), fidelity)


def test_a_rope_model_keeps_its_rope():
    rope = rope_for_model(_model_config(transformers.LlamaConfig(hidden_size=64, num_attention_heads=2)), "fast")
    assert torch.count_nonzero(rope.inv_freq) == rope.rotary_dim // 2


KV = {"kv_connector": "KVReuseConnector", "kv_connector_module_path": "kvreuse.connector", "kv_role": "kv_both",
      "kv_connector_extra_config": {"cost": {"learn": False, "step_overhead_s": 0.0}}}


@pytest.fixture(scope="module")
def tiny_opt(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("models") / "opt",
                            TinySpec(arch="opt", num_layers=2, num_heads=2, num_kv_heads=2, head_dim=32))


@pytest.mark.slow
def test_opt_is_served_exact_like_vllm_alone(tiny_opt, tmp_path):
    """Learned absolute positions: kvreuse (its own reuse only: vLLM's prefix cache off) places stored KV and
    returns what vLLM alone does."""
    from openai import OpenAI

    rng = random.Random(7)
    w = tiny_words()
    stored = " ".join(rng.choice(w) for _ in range(400))

    def complete(s, prompt):
        c = OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        r = c.completions.create(model=c.models.list().data[0].id, prompt=prompt, max_tokens=6, temperature=0,
                                 logprobs=1)
        return r.choices[0].text, r.choices[0].logprobs.token_logprobs, r.usage.prompt_tokens_details.cached_tokens

    pair = running_pair(tiny_opt, tmp_path, "opt", KV, on_extra=["--scheduler-cls", SCHEDULER_CLS,
                                                                 "--no-async-scheduling",
                                                                 "--no-enable-prefix-caching"])
    on, off = next(pair)
    try:
        complete(on, stored + " kobe")
        for tail in (" lada", " nemo bafa"):
            got, want = complete(on, stored + tail), complete(off, stored + tail)
            assert_same(got, want)
            assert got[2] >= 300, f"only {got[2]} prompt tokens placed"
    finally:
        pair.close()


@pytest.mark.slow
def test_opt_refuses_fast_fidelity_at_startup(tiny_opt, tmp_path):
    kv = {**KV, "kv_connector_extra_config": {"policy": {"fidelity": "fast"}}}
    port = free_port()
    s = Server(vllm_argv(tiny_opt, port, kv=kv), port, tmp_path / "fast.log")
    assert s.wait_exit(240) != 0
    assert "places KV at new positions, which this model does not allow" in s.log.read_text(errors="replace")
