"""Fast tests of the connector's vLLM-free logic: segmentation, claims, policies, config, stats."""

from __future__ import annotations

import random

import pytest

from kvreuse.connector.claim import Directory, chunk_keys, choose_policy, context_signature, plan_claim, plan_saves
from kvreuse.connector.config import ConnectorConfig, ConnectorConfigError, ChunkingConfig
from kvreuse.connector.scheduler import opted_out
from kvreuse.connector.segment import MMSpan, segment

MODEL = b"m" * 16
CFG = ChunkingConfig(min_tokens=8, avg_tokens=24, max_tokens=48)
START = 2  # message-start token


def message(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [START] + [rng.randrange(10, 500) for _ in range(n)]


def prompt(*msgs: list[int]) -> list[int]:
    return [t for m in msgs for t in m]


def cut(tokens):
    return segment(tokens, CFG, boundary_ids=frozenset({START}))


def store_all(directory: Directory, tokens, chunks, keys):
    for it in plan_saves(tokens, chunks, keys, directory, set(), True):
        directory.record(it.key, it.end - it.start, it.preceding)


# ---------------------------------------------------------------- segmentation
def test_segments_cover_prompt_and_respect_sizes():
    toks = prompt(message(1, 300), message(2, 5))
    chunks = cut(toks)
    assert chunks[0].start == 0 and chunks[-1].end == len(toks)
    assert all(a.end == b.start for a, b in zip(chunks, chunks[1:]))
    assert all(c.num_tokens <= CFG.max_tokens for c in chunks)
    assert any(c.start == 301 for c in chunks), "a message start always starts a chunk"


def test_same_message_cuts_the_same_anywhere():
    m = message(3, 200)
    a, b = prompt(message(4, 30), m), prompt(message(5, 77), message(6, 12), m)
    ca = [(c.start - 31, c.end - 31) for c in cut(a) if c.start >= 31]
    cb = [(c.start - 91, c.end - 91) for c in cut(b) if c.start >= 91]
    assert ca == cb


def test_mm_span_is_one_chunk_and_never_split():
    toks = list(range(10, 200))
    chunks = segment(toks, CFG, spans=[MMSpan("img-1", 40, 100)])
    img = [c for c in chunks if c.mm_ids]
    assert len(img) == 1 and (img[0].start, img[0].end) == (40, 140)
    assert not any(c.start < 140 < c.end or c.start < 40 < c.end for c in chunks)


def test_keys_depend_on_salt_and_media():
    toks = message(7, 40)
    ch = cut(toks)
    assert chunk_keys(toks, ch, MODEL, None) != chunk_keys(toks, ch, MODEL, "tenant")
    ch_img = segment(toks, CFG, spans=[MMSpan("a", 1, 10)])
    ch_img2 = segment(toks, CFG, spans=[MMSpan("b", 1, 10)])
    assert chunk_keys(toks, ch_img, MODEL, None) != chunk_keys(toks, ch_img2, MODEL, None)


# ---------------------------------------------------------------- claims
def _setup(*msgs):
    d = Directory()
    toks = prompt(*msgs)
    ch = cut(toks)
    keys = chunk_keys(toks, ch, MODEL, None)
    store_all(d, toks, ch, keys)
    return d


def test_reorder_is_claimed_leaving_one_token():
    sys_, a, b, q = message(10, 20), message(11, 100), message(12, 100), message(13, 5)
    d = _setup(sys_, a, b, q)
    toks = prompt(sys_, b, a, message(14, 5))
    ch = cut(toks)
    claim = plan_claim(toks, ch, chunk_keys(toks, ch, MODEL, None), d, 0)
    assert claim.num_tokens >= len(prompt(sys_, b, a)) and claim.num_tokens <= len(toks) - 1
    # sys: exact; b (recorded after sys + a): survival; a (recorded after sys only, now after b too): blind
    assert [it.policy for it in claim.items][0] == "exact"
    assert {"survival", "blind"} <= {it.policy for it in claim.items}
    mode_claim = plan_claim(toks, ch, chunk_keys(toks, ch, MODEL, None), d, 0, "patched_or_exact")
    assert mode_claim.num_tokens < claim.num_tokens and "blind" not in {it.policy for it in mode_claim.items}


def test_claim_ends_at_first_miss_and_counts_later_hits_as_misses():
    sys_, a, b = message(20, 20), message(21, 100), message(22, 100)
    d = _setup(sys_, a, b, message(23, 5))
    toks = prompt(sys_, message(24, 60), a, b, message(25, 5))
    ch = cut(toks)
    claim = plan_claim(toks, ch, chunk_keys(toks, ch, MODEL, None), d, 0)
    assert claim.num_tokens == len(sys_)
    n_after = sum(1 for c in ch if c.start >= len(sys_) and c.end <= len(toks) - 1)
    assert claim.misses == n_after and claim.hits == sum(1 for c in ch if c.end <= len(sys_))


def test_claim_after_prefix_hit_loads_partial_chunk():
    sys_, a = message(30, 20), message(31, 120)
    d = _setup(sys_, a, message(32, 5))
    toks = prompt(sys_, a, message(33, 5))
    ch = cut(toks)
    claim = plan_claim(toks, ch, chunk_keys(toks, ch, MODEL, None), d, 50)
    first = claim.items[0]
    assert first.dst_start == 50 and first.src_start == 50 - next(c.start for c in ch if c.start <= 50 < c.end)
    assert 50 + claim.num_tokens == max(c.end for c in ch if c.end <= len(toks) - 1 and c.end <= len(prompt(sys_, a)))


def test_whole_prompt_cached_still_computes_one_token():
    msgs = (message(40, 20), message(41, 100))
    d = _setup(*msgs)
    toks = prompt(*msgs)
    ch = cut(toks)
    claim = plan_claim(toks, ch, chunk_keys(toks, ch, MODEL, None), d, 0)
    assert claim.num_tokens <= len(toks) - 1


def test_policies():
    A, B, C, X = b"a" * 16, b"b" * 16, b"c" * 16, b"x" * 16
    d = Directory()
    d.record(X, 4, (A, B, C))
    e = d.get(X)
    assert choose_policy(e, (A, B, C), "any")[0] == "exact"
    assert choose_policy(e, (A, C), "any")[0] == "survival"
    assert choose_policy(e, (C, A, B), "any")[0] == "reorder"
    assert choose_policy(e, (B, A), "any")[0] == "blind"
    assert choose_policy(e, (B, A), "patched_or_exact") is None
    assert choose_policy(e, (A, B, C), "patched_or_exact") == ("exact", context_signature((A, B, C)))


def test_saves_capture_new_contexts_only():
    sys_, a = message(50, 20), message(51, 80)
    toks = prompt(sys_, a)
    ch = cut(toks)
    keys = chunk_keys(toks, ch, MODEL, None)
    d = Directory()
    first = plan_saves(toks, ch, keys, d, set(), True)
    assert all(it.is_new for it in first) and len(first) == len(ch)
    store_all(d, toks, ch, keys)
    assert plan_saves(toks, ch, keys, d, set(), True) == []
    toks2 = prompt(message(52, 30), a)
    ch2 = cut(toks2)
    keys2 = chunk_keys(toks2, ch2, MODEL, None)
    again = plan_saves(toks2, ch2, keys2, d, set(), True)
    assert any(not it.is_new for it in again), "a stored chunk in a new context is saved for patch capture"
    assert not any(it.key in set(keys) and it.is_new for it in again)


# ---------------------------------------------------------------- config and opt-out
@pytest.mark.parametrize("extra,bad", [({"bogus": 1}, "bogus"), ({"policy": {"mode": "x"}}, "policy.mode"),
                                       ({"chunking": {"min_tokens": 0}}, "chunking"),
                                       ({"chunking": {"nope": 1}}, "chunking.nope"),
                                       ({"store": {"device_bytes": "lots"}}, "device_bytes"),
                                       ({"save": "yes"}, "save"),
                                       ({"policy": {"patch_max_rank": "4"}}, "policy.patch_max_rank")])
def test_bad_config_names_the_key(extra, bad):
    with pytest.raises(ConnectorConfigError, match=bad.replace(".", r"\.")):
        ConnectorConfig.from_extra_config(extra)


def test_config_defaults_and_values():
    c = ConnectorConfig.from_extra_config({"policy": {"mode": "patched_or_exact", "patch_max_rank": 4},
                                           "chunking": {"boundary_tokens": ["<s>"]}, "store": {"host_bytes": "1MiB"}})
    assert c.policy.mode == "patched_or_exact" and c.policy.patch_max_rank == 4
    assert c.chunking.boundary_tokens == ("<s>",) and c.store.host_bytes == 2**20
    assert ConnectorConfig.from_extra_config(None).store.device_bytes == 2**30


def test_opt_out():
    assert opted_out({"kvreuse": False}) and opted_out({"kvreuse": {"enabled": False}}) and opted_out({"kvreuse": "off"})
    assert not opted_out(None) and not opted_out({}) and not opted_out({"kvreuse": {"inject_load_failure": True}})
