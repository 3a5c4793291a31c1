"""bench/repair_frontier.py's replay: placed KV re-rotated as the server's workers place it, exact placements
giving full prefill's answers, and the bench-only bounds computing what they name.  A small random Llama with
SmolLM2's tokenizer (the workloads' chat template) keeps it quick; slow only for the checkpoint build."""

from __future__ import annotations

import pytest
import torch

from bench import repair_frontier as rf
from bench.fidelity.workloads import WORKLOADS, render

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from kvreuse.models.smollm2 import build_smollm2

    return AutoTokenizer.from_pretrained(str(build_smollm2()))


@pytest.fixture(scope="module")
def model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=1e5, max_position_embeddings=4096)
    return LlamaForCausalLM(cfg).eval()


def test_rerotated_keys_are_the_keys_computed_at_the_new_positions(model):
    """A prompt run at positions shifted by d has, at every layer, its keys rotated by d (RoPE is relative)."""
    from transformers import DynamicCache

    ids = list(range(100, 140))
    replay = rf.Replay(model, None)
    at0, at37 = DynamicCache(), DynamicCache()
    replay.forward(ids, 0, at0)
    replay.forward(ids, 37, at37)
    delta = torch.full((len(ids),), 37)
    for layer in range(model.config.num_hidden_layers):
        got = rf.rerotate(model.model.rotary_emb, at0.layers[layer].keys, delta)
        assert torch.allclose(got, at37.layers[layer].keys, atol=1e-4), layer
        assert not torch.allclose(at0.layers[layer].keys, at37.layers[layer].keys, atol=1e-2)


def test_exact_placements_replay_full_prefill_and_fast_ones_are_placed(model, tok):
    requests = WORKLOADS["agent_chat"](6)
    refs: dict = {}
    exact = rf.summary(rf.run_arm(model, tok, requests, {}, refs, 0.022, 0.0006))
    assert exact["same_answer"] == 1.0 and exact["placed_share"] > 0  # the system prompt, placed exact
    fast = rf.summary(rf.run_arm(model, tok, requests, {"policy": {"fidelity": "fast"}}, refs, 0.022, 0.0006))
    assert fast["placed_share"] > exact["placed_share"] + 0.3
    assert fast["ttft_est_mean"] < exact["ttft_est_mean"]


def test_bounds_compute_what_they_name(tok):
    from kvreuse.connector.claim import LoadItem

    req = WORKLOADS["rag"](1)[0]
    text = render(req, tok)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    n = len(enc["input_ids"])
    whole = [LoadItem(b"k", tuple(range(n - 1)), 0, n - 1, 0, b"c", "blind")]
    placed = lambda loads: {t for it in loads for t in range(it.dst_start, it.dst_end)}  # noqa: E731
    assert placed(rf.forced("tail:50", whole, text, enc["offset_mapping"], n)) == set(range(n - 50))
    starts = placed(rf.forced("starts:4", whole, text, enc["offset_mapping"], n))
    assert len(starts) == n - 1 - 4 * text.count("\n\n")
    for at in (i for i in range(n) if i not in starts and i < n - 1):  # each computed run follows a blank line
        assert at - 1 in starts or "\n" in tok.decode(enc["input_ids"][max(0, at - 4):at])
