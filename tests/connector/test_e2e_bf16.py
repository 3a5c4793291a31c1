"""bfloat16 end to end (slow): where vLLM's CPU backend picks its AMX kernels, the page is tiled
(`kvreuse.layout.Reading.CPU_ATTN_AMX`); elsewhere it is CPU_ATTN's plain page.  kvreuse must read and
write whichever vLLM chose: placed chunks give the answers computed ones give.

One pair of servers (kvreuse on, off) on the 1-layer model served in bfloat16.  A chunk's KV in a
1-layer model does not depend on its context, but in bfloat16 a relocated key is rounded once more
than a computed one (re-rotated in float32 from the stored bfloat16 key), so logprobs are compared
within a bfloat16 tolerance.  The tiny random model's next-token distribution is nearly flat (top
logprob about -4), so a bfloat16 rounding can swap two near-tied tokens: the first generated
token's top-5 logprobs are compared, not greedy texts.
"""

from __future__ import annotations

import pytest
import torch

from connector_helpers import Server, running_pair
from test_e2e_server import KV_ON, client, msgs, text

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bf16_servers(tiny_1layer, tmp_path_factory):
    yield from running_pair(tiny_1layer, tmp_path_factory.mktemp("logs_bf16"), "bf16", KV_ON, dtype="bfloat16")


def top5(s: Server, m) -> tuple[dict[str, float], int]:
    """The first generated token's top-5 logprobs, and the prompt tokens placed."""
    c = client(s)
    r = c.chat.completions.create(model=c.models.list().data[0].id, messages=m, max_tokens=1, temperature=0,
                                  logprobs=True, top_logprobs=5)
    top = r.choices[0].logprobs.content[0].top_logprobs
    return {t.token: t.logprob for t in top}, r.usage.prompt_tokens_details.cached_tokens


def test_bf16_placements_answer_as_computed(bf16_servers):
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    on, off = bf16_servers
    # the kernels (and page) vLLM picks for this model here: "amx" on CPUs with AMX tiles
    print("vLLM CPU attention isa:", _get_attn_isa(torch.bfloat16, 128, 32))
    sys_, A, B, C = text(31, 40), text(32, 150), text(33, 130), text(34, 170)
    placed = 0
    for m in (msgs(sys_, [A, B, C], text(35, 10)), msgs(sys_, [C, A, B], text(36, 10)),
              msgs(sys_, [B, C], text(37, 10)), msgs(text(38, 12), [A, C], text(39, 10))):
        (got, n), (want, _) = top5(on, m), top5(off, m)
        common = got.keys() & want.keys()
        assert len(common) >= 3, (got, want)
        worst = max(abs(got[t] - want[t]) for t in common)
        assert worst <= 0.05, (got, want)
        placed += n
    assert placed >= 300, f"only {placed} prompt tokens placed"
    assert on.proc.poll() is None and "Traceback" not in on.log.read_text()
