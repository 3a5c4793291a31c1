"""Gap-fill with images: captioned screenshots reordered in one user message (slow).

One pair of servers on the tiny 1-layer float32 Qwen2-VL (a chunk's KV does not depend on its
context, so every placement must reproduce the reference within 1e-4):
  * on:  kvreuse with the segmented-prefill scheduler, the vision-encoder hook of
         `tests/support/encoder_count.py` loaded as a worker extension;
  * off: vLLM alone.
Turn 1 is one user message [img A, caption A, img B, caption B, img C, caption C, question]; turn 2
[img C, caption C, img A, caption A, new img D, caption D, question]: C and A move, B is dropped,
D is new.  Chunking restarts at each image, so a caption next to its image is cut the same wherever
the pair sits, and the segmented scheduler places every stored chunk past the gaps (the message
header, new image D): from turn 2 the stored images and their captions are placed and only D is
encoded.  No timing is used.
"""

from __future__ import annotations

import random

import pytest
from openai import OpenAI

from connector_helpers import Server, free_port, vllm_argv
from kvreuse.connector.segmented_cls import SCHEDULER_CLS
from kvreuse.models.tiny_vl import vl_words
from kvreuse.models.trace import image_data_url
from tests.support.encoder_count import encoded_items, encoder_count_args, encoder_count_env

pytestmark = pytest.mark.slow

# cost learning off and no step overhead: every stored run of >= 16 tokens is placed (what a placement
# saves is the cost model's own unit test; here placement and exactness are checked)
KV = {"kv_connector": "KVReuseConnector", "kv_connector_module_path": "kvreuse.connector", "kv_role": "kv_both",
      "kv_connector_extra_config": {"policy": {"fidelity": "fast"}, "cost": {"learn": False, "step_overhead_s": 0.0}}}
MM = ["--limit-mm-per-prompt", '{"image": 4, "video": 0}', "--max-model-len", "2048"]
SEGMENTED = ["--scheduler-cls", SCHEDULER_CLS, "--no-async-scheduling"]
IMAGE_TOKENS = 16       # a 112x112 picture on the tiny checkpoint
CAPTION_WORDS = 32      # one token per word (the tiny tokenizer)
REUSED = 'kvreuse_mm_items_reused_total{modality="image"}'


@pytest.fixture(scope="module")
def pair(tiny_qwen2_vl, tmp_path_factory):
    logs = tmp_path_factory.mktemp("mmgaps")
    enc_log = logs / "on.encoder"
    enc_log.touch()
    p_on, p_off = free_port(), free_port()
    on = Server(vllm_argv(tiny_qwen2_vl, p_on, kv=KV, extra=[*MM, *SEGMENTED, *encoder_count_args()]), p_on,
                logs / "on.log", env=encoder_count_env(enc_log))
    off = Server(vllm_argv(tiny_qwen2_vl, p_off, kv=None, extra=MM), p_off, logs / "off.log")
    try:
        on.wait_ready()
        off.wait_ready()
        yield on, off, enc_log
    finally:
        on.stop()
        off.stop()


def words(seed: int, n: int) -> str:
    rng = random.Random(seed)
    w = vl_words()
    return " ".join(rng.choice(w) for _ in range(n))


def turn(order: tuple[int, ...], question: int) -> list[dict]:
    """System message, then one user message: (image i, caption i) for i in `order`, then a question."""
    content = []
    for i in order:
        content += [{"type": "image_url", "image_url": {"url": image_data_url(800 + i)}},
                    {"type": "text", "text": words(810 + i, CAPTION_WORDS)}]
    content.append({"type": "text", "text": words(question, 6)})
    return [{"role": "system", "content": words(820, 32)}, {"role": "user", "content": content}]


def ask(s: Server, msgs: list[dict]):
    c = OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    r = c.chat.completions.create(model=c.models.list().data[0].id, messages=msgs, max_tokens=8, temperature=0,
                                  logprobs=True)
    lp = [t.logprob for t in r.choices[0].logprobs.content]
    return r.choices[0].message.content, lp, r.usage.prompt_tokens_details.cached_tokens or 0, r.usage.prompt_tokens


def assert_same(a, b, tol=1e-4) -> float:
    assert a[0] == b[0], f"greedy tokens differ: {a[0]!r} vs {b[0]!r}"
    worst = max(abs(x - y) for x, y in zip(a[1], b[1]))
    assert worst <= tol, f"logprobs differ by {worst:.3g}"
    return worst


def test_captioned_images_reordered(pair):
    on, off, enc_log = pair
    A, B, C, D = range(4)
    first = turn((A, B, C), 830)
    e0 = encoded_items(enc_log)
    got = ask(on, first)
    assert encoded_items(enc_log) - e0 == 3, "turn 1 encodes its three images"
    assert_same(got, ask(off, first))

    second = turn((C, A, D), 831)
    e0, m0 = encoded_items(enc_log), on.metrics()
    got = ask(on, second)
    enc, m1 = encoded_items(enc_log) - e0, on.metrics()
    worst = assert_same(got, ask(off, second))
    cached, prompt = got[2], got[3]
    assert enc == 1, f"turn 2: the encoder ran for {enc} images (only the new one should be encoded)"
    assert m1.get(REUSED, 0) - m0.get(REUSED, 0) == 2, "images C and A are placed, not encoded"
    # C and A and caption A (its text between two images is the same chunk in both turns) are placed,
    # past the computed message header; caption C up to its last content-defined cut
    assert cached >= 2 * IMAGE_TOKENS + CAPTION_WORDS, f"turn 2: only {cached} tokens placed"
    assert cached >= 0.6 * prompt, f"turn 2: {cached}/{prompt} prompt tokens placed"
    seg = m1.get('kvreuse_segments_total{kind="placed"}', 0) - m0.get('kvreuse_segments_total{kind="placed"}', 0)
    # at least one placed segment after the computed message header (a gap); where a caption's last cut
    # falls decides whether a second gap splits the placement in two, so no more is asked
    assert seg >= 1, f"placed segments: {seg} (stored chunks after a gap are placed)"
    print(f"captioned images reordered: {cached}/{prompt} placed, {seg:.0f} placed segments, "
          f"max |logprob diff| = {worst:.3g}")
