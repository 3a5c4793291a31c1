"""Multimodal chunks end to end through the openai client (chat completions with `image_url`), slow.

Two servers for the whole module, started together:
  * Qwen2-VL, 1 layer, float32, kvreuse on: exactness (reuse vs no reuse within 1e-4), the
    screenshot-agent trace, data: URL re-send, client uuids;
  * Qwen2.5-VL, 1 layer, bfloat16, kvreuse on: the trace again, and the bf16 divergence.
The no-reuse reference is the same server with `kv_transfer_params: {"kvreuse": false}` and a fresh
`cache_salt` (no kvreuse, no prefix-cache hit).  Vision-encoder runs are counted twice, independently:
a test hook loaded as a vLLM worker extension (`tests/support/encoder_count.py`: every
`embed_multimodal` call of the model logs the items it encoded) and the connector's `kvreuse_encoder_inputs_total` (what vLLM's scheduler sent
to the encoder).  No timing is used.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from openai import OpenAI

from connector_helpers import Server, free_port, vllm_argv
from kvreuse.models.tiny_vl import vl_words
from kvreuse.models.trace import image_data_url, screenshot_trace, video_data_url
from tests.support.encoder_count import encoded_items, encoder_count_args, encoder_count_env

pytestmark = pytest.mark.slow

# fidelity "fast": media placed at new positions after other content (what these tests check)
KV_ON = {"kv_connector": "KVReuseConnector", "kv_connector_module_path": "kvreuse.connector", "kv_role": "kv_both",
         "kv_connector_extra_config": {"policy": {"fidelity": "fast"}}}
MM_ARGS = ["--limit-mm-per-prompt", '{"image": 4, "video": 0}', "--max-model-len", "2048"]
MM_ARGS_VIDEO = ["--limit-mm-per-prompt", '{"image": 4, "video": 1}', "--max-model-len", "2048"]
IMAGE_TOKENS = 16  # a 112x112 picture on the tiny checkpoints
_ref = itertools.count()


class VLServer:
    def __init__(self, model: Path, dtype: str, logs: Path, name: str, mm_args: list[str] = MM_ARGS) -> None:
        self.model, self.encoder_log = model, logs / f"{name}.encoder"
        self.encoder_log.touch()
        port = free_port()
        self.server = Server(vllm_argv(model, port, kv=KV_ON, dtype=dtype, extra=[*mm_args, *encoder_count_args()]),
                             port, logs / f"{name}.log", env=encoder_count_env(self.encoder_log))
        self.client = OpenAI(base_url=self.server.url + "/v1", api_key="unused", max_retries=0, timeout=180)
        self.model_id = None

    def encoded(self, modality: str = "image") -> int:
        """Items of `modality` the vision encoder has encoded so far (the test hook's log)."""
        return encoded_items(self.encoder_log, modality)

    def metric(self, name: str) -> float:
        return self.server.metrics().get(name, 0.0)

    def ask(self, msgs, *, reference: bool = False, max_tokens: int = 6, salt: str | None = None):
        extra = {"kv_transfer_params": {"kvreuse": False},
                 "cache_salt": salt or f"ref-{next(_ref)}"} if reference else ({"cache_salt": salt} if salt else None)
        if self.model_id is None:
            self.model_id = self.client.models.list().data[0].id
        r = self.client.chat.completions.create(model=self.model_id, messages=msgs, max_tokens=max_tokens,
                                                temperature=0, logprobs=True, top_logprobs=2, extra_body=extra)
        lp = [t.logprob for t in r.choices[0].logprobs.content]
        top = [{c.token: c.logprob for c in t.top_logprobs} for t in r.choices[0].logprobs.content]
        return (r.choices[0].message.content, lp, r.usage.prompt_tokens_details.cached_tokens, r.usage.prompt_tokens,
                [t.token for t in r.choices[0].logprobs.content], top)


@pytest.fixture(scope="module")
def servers(tiny_qwen2_vl, tiny_qwen2_5_vl_bf16, tmp_path_factory):
    logs = tmp_path_factory.mktemp("mmlogs")
    q2 = VLServer(tiny_qwen2_vl, "float32", logs, "qwen2_vl")
    q25 = VLServer(tiny_qwen2_5_vl_bf16, "bfloat16", logs, "qwen2_5_vl", MM_ARGS_VIDEO)
    try:
        q2.server.wait_ready()
        q25.server.wait_ready()
        yield q2, q25
    finally:
        q2.server.stop()
        q25.server.stop()


def image_ends(model: Path, msgs) -> list[int]:
    """End (exclusive) of each image placeholder span in the prompt vLLM builds for `msgs`."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    ends, n = [], 0
    for t in ids:
        n += IMAGE_TOKENS if t == pad else 1
        if t == pad:
            ends.append(n)
    return ends


def assert_same(a, b, tol):
    """Same greedy tokens and logprobs within `tol` (fp32: 1e-4).  Returns the largest logprob difference."""
    assert a[0] == b[0], f"greedy tokens differ: {a[0]!r} vs {b[0]!r}"
    worst = max(abs(x - y) for x, y in zip(a[1], b[1]))
    assert worst <= tol, f"logprobs differ by {worst:.3g}"
    return worst


def assert_within_bf16_noise(a, b, tol):
    """bf16: logprobs within `tol` up to the first differing token, and a differing token only at a near tie
    (the reference ranks both tokens within `tol` of each other).  Returns the largest logprob difference."""
    worst = 0.0
    for i, (ta, tb) in enumerate(zip(a[4], b[4])):
        worst = max(worst, abs(a[1][i] - b[1][i]))
        assert worst <= tol, f"token {i}: logprobs differ by {worst:.3g}"
        if ta != tb:
            ref = b[5][i]
            assert ta in ref and abs(ref[ta] - ref[tb]) <= tol, f"token {i}: {ta!r} vs {tb!r} is not a near tie"
            break
    return worst


def user_image(url: str, caption: str, uuid: str | None = None) -> dict:
    part = {"type": "image_url", "image_url": {"url": url}}
    if uuid:
        part["uuid"] = uuid
    return {"role": "user", "content": [part, {"type": "text", "text": caption}]}


def words(seed: int, n: int) -> str:
    import random

    rng = random.Random(seed)
    w = vl_words()
    return " ".join(rng.choice(w) for _ in range(n))


def run_trace(s: VLServer, *, seed: int, turns: int, tol: float, uuids: bool = False, bf16: bool = False) -> float:
    """The screenshot-agent trace: per turn, check reuse, encoder runs and reuse-vs-reference agreement."""
    worst = 0.0
    for t, turn in enumerate(screenshot_trace(turns, seed=seed, words=vl_words(), uuids=uuids)):
        msgs = turn["messages"]
        enc0, inputs0 = s.encoded(), s.metric('kvreuse_encoder_inputs_total{modality="image"}')
        reused0 = s.metric('kvreuse_mm_items_reused_total{modality="image"}')
        got = s.ask(msgs)
        enc = s.encoded() - enc0
        inputs = s.metric('kvreuse_encoder_inputs_total{modality="image"}') - inputs0
        reused = s.metric('kvreuse_mm_items_reused_total{modality="image"}') - reused0
        ends = image_ends(s.model, msgs)
        assert got[3] == ends[-1] + 1 + 6 + 1 + 11 + 2, "prompt layout (image spans) as expected"
        if t == 0:
            assert enc == 4 and inputs == 4 and reused == 0, (t, enc, inputs, reused)
        else:
            # the three surviving screenshots are reused: cached_tokens covers their spans ...
            assert got[2] >= ends[2], f"turn {t}: cached {got[2]} < end of the third screenshot {ends[2]}"
            assert got[2] < ends[3], f"turn {t}: the new screenshot cannot be cached"
            # ... and the encoder runs for the new one only
            assert reused == 3, (t, reused)
            assert enc == 1 and inputs == 1, f"turn {t}: encoder ran for {enc} images ({inputs} scheduled)"
        check = assert_within_bf16_noise if bf16 else assert_same
        worst = max(worst, check(got, s.ask(msgs, reference=True), tol))
    return worst


def test_screenshot_agent_trace_qwen2_vl(servers):
    q2, _ = servers
    worst = run_trace(q2, seed=1, turns=5, tol=1e-4)
    print(f"qwen2-vl fp32 trace: max |logprob diff| reuse vs no reuse = {worst:.3g}")


def test_shifted_and_reordered_images_exact(servers):
    q2, _ = servers
    sys_ = {"role": "system", "content": words(10, 24)}
    a, b, c = (user_image(image_data_url(500 + i), words(20 + i, 5)) for i in range(3))
    q = lambda i: {"role": "user", "content": words(30 + i, 8)}  # noqa: E731
    plan = [[sys_, a, b, c, q(0)],                                     # computes A, B, C
            [sys_, c, a, b, q(1)],                                     # reordered
            [sys_, b, c, q(2)],                                        # shifted (A dropped)
            [sys_, a, c, q(3)]]                                        # survival
    for i, m in enumerate(plan):
        enc0 = q2.encoded()
        got = q2.ask(m, max_tokens=8)
        if i:
            ends = image_ends(q2.model, m)
            assert got[2] >= ends[-1], f"request {i}: cached {got[2]} does not cover every image ({ends})"
            assert q2.encoded() == enc0, f"request {i}: the encoder ran for a reused image"
        assert_same(got, q2.ask(m, reference=True, max_tokens=8), 1e-4)


def test_data_url_resend_and_client_uuid(servers):
    q2, _ = servers
    sys_ = {"role": "system", "content": words(40, 24)}
    x, y = image_data_url(900), image_data_url(901)
    q2.ask([sys_, user_image(y, words(41, 5)), user_image(x, words(42, 5)), {"role": "user", "content": words(43, 8)}])
    # the identical data: URL again, at another offset (Y dropped): vLLM's identifier of the bytes is the same
    enc0, r0 = q2.encoded(), q2.metric('kvreuse_mm_items_reused_total{modality="image"}')
    m = [sys_, user_image(x, words(42, 5)), {"role": "user", "content": words(44, 8)}]
    got = q2.ask(m)
    assert got[2] >= image_ends(q2.model, m)[0] and q2.encoded() == enc0
    assert q2.metric('kvreuse_mm_items_reused_total{modality="image"}') - r0 == 1
    # the same picture re-encoded (JPEG instead of PNG) is another identity ... unless the client names it
    jpeg = image_data_url(900, fmt="JPEG")
    m = [sys_, user_image(jpeg, words(42, 5)), {"role": "user", "content": words(45, 8)}]
    enc0 = q2.encoded()
    got = q2.ask(m)
    assert got[2] < image_ends(q2.model, m)[0] and q2.encoded() == enc0 + 1
    sys2 = {"role": "system", "content": words(46, 24)}
    q2.ask([sys2, user_image(x, words(47, 5), uuid="shot-42"), {"role": "user", "content": words(48, 8)}])
    enc0 = q2.encoded()
    m = [sys2, {"role": "user", "content": words(49, 6)}, user_image(jpeg, words(47, 5), uuid="shot-42"),
         {"role": "user", "content": words(50, 8)}]
    got = q2.ask(m)
    # the new text message before it is a miss, so the claim stops there; send it again after the uuid'd image
    m2 = [sys2, user_image(jpeg, words(47, 5), uuid="shot-42"), {"role": "user", "content": words(51, 8)}]
    got2 = q2.ask(m2)
    assert got2[2] >= image_ends(q2.model, m2)[0], "a client uuid is the image's identity"
    assert q2.encoded() == enc0 + 0, "uuid'd image: served from vLLM's encoder cache or kvreuse, never re-encoded"
    del got


def test_screenshot_agent_trace_qwen2_5_vl_bf16(servers):
    _, q25 = servers
    worst = run_trace(q25, seed=2, turns=4, tol=0.05, uuids=True, bf16=True)
    # bf16 noise floor, no kvreuse at all: a prompt computed whole vs the same prompt after vLLM's own prefix
    # hit (the rest prefilled as a separate piece)
    m = screenshot_trace(4, seed=2, words=vl_words(), uuids=True)[-1]["messages"]
    whole = q25.ask(m, reference=True, salt="floor")
    split = q25.ask(m, reference=True, salt="floor")
    floor = max(abs(x - y) for x, y in zip(whole[1], split[1])) if split[2] else float("nan")
    print(f"qwen2.5-vl bf16 trace: max |logprob diff| reuse vs no reuse = {worst:.3g}; "
          f"vLLM prefix hit vs none (bf16 floor) = {floor:.3g} ({split[2]} tokens prefix-cached)")


def test_video_moved_keeps_temporal_positions_bf16(servers):
    """A clip (8 frames at 1 fps: 4 frame groups, temporal positions 0, 4, 8, 12 on Qwen2.5-VL) moved from
    after a screenshot to before it, and a new screenshot added: the clip is reused, not re-encoded."""
    _, q25 = servers
    sys_ = {"role": "system", "content": words(60, 24)}
    clip = {"role": "user", "content": [{"type": "video_url", "video_url": {"url": video_data_url(7)}},
                                        {"type": "text", "text": words(61, 5)}]}
    shot, new = user_image(image_data_url(700), words(62, 5)), user_image(image_data_url(701), words(63, 5))
    q = lambda i: {"role": "user", "content": words(64 + i, 8)}  # noqa: E731
    q25.ask([sys_, shot, clip, q(0)])
    v0, i0 = q25.encoded("video"), q25.encoded("image")
    r0 = q25.metric('kvreuse_mm_items_reused_total{modality="video"}')
    m = [sys_, clip, shot, new, q(1)]
    got = q25.ask(m)
    assert q25.encoded("video") == v0 and q25.encoded("image") == i0 + 1, "only the new screenshot is encoded"
    assert q25.metric('kvreuse_mm_items_reused_total{modality="video"}') - r0 == 1
    assert got[2] >= image_ends(q25.model, m)[0], "the clip and the screenshot after it are reused"
    worst = assert_within_bf16_noise(got, q25.ask(m, reference=True), 0.05)
    print(f"qwen2.5-vl bf16 moved video: max |logprob diff| = {worst:.3g}")


def test_cache_salt_isolates_images_and_uuids(servers):
    """An image stored under one salt is never placed under another, by content or by client uuid."""
    q2, _ = servers
    reused = 'kvreuse_mm_items_reused_total{modality="image"}'
    sys_ = {"role": "system", "content": words(60, 24)}
    x, y, z = image_data_url(920), image_data_url(921), image_data_url(922)
    # same layout each time (a claim stops at the first chunk not stored): only the salt differs
    at = lambda img, i, **kw: [sys_, user_image(img, words(70, 5), **kw), {"role": "user", "content": words(i, 8)}]  # noqa: E731
    q2.ask(at(x, 62), salt="tenant-a")
    r0 = q2.metric(reused)
    other = q2.ask(at(x, 63), salt="tenant-b")
    assert other[2] == 0 and q2.metric(reused) == r0, "tenant-b was served tenant-a's image"
    own = q2.ask(at(x, 64), salt="tenant-a")
    assert own[2] >= image_ends(q2.model, at(x, 64))[0], "tenant-a reuses its own image"
    # a client uuid names an item only within a salt: another tenant's picture under tenant-a's uuid
    # (a tenant new to the server: nothing of its own is stored, so it must reuse nothing at all)
    q2.ask(at(y, 65, uuid="shot-7"), salt="tenant-a")
    r0, enc0 = q2.metric(reused), q2.encoded()
    got = q2.ask(at(z, 66, uuid="shot-7"), salt="tenant-c")
    assert got[2] == 0 and q2.metric(reused) == r0, "a uuid crossed salts in kvreuse"
    print(f"tenant-c's uuid-named picture: {q2.encoded() - enc0} encoder runs (0: vLLM's encoder cache served it)")
