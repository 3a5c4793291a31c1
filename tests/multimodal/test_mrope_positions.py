"""M-RoPE position arithmetic of multimodal chunks, against vLLM's own `get_mrope_input_positions` (fast).

The model's function runs on a config-only stand-in (`kvreuse.connector.mrope.positions_fn_for`),
exactly as the connector calls it.  Checked here:
  * the docstring's closed form (text `s+i` on all axes; media `s + (floor(t f), h, w)`, then
    `s += max(...) + 1`) reproduces the model's positions, images and videos, Qwen2-VL and 2.5-VL;
  * whole chunks (an item, or text between items) move by one offset on all three axes when items
    are shifted, dropped or reordered, video temporal offsets included;
  * relocating keys by those positions equals rotating them at the destination directly;
  * the claim carries each item's destination positions, and the worker refuses a non-shift.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from kvreuse.connector.claim import Directory, chunk_keys
from kvreuse.connector.plan import plan_saves, plan_segments
from kvreuse.connector.config import ChunkingConfig
from kvreuse.connector.mrope import chunk_shift, positions_fn_for, text_positions
from kvreuse.connector.segment import mm_spans, segment
from kvreuse.ops import relocate
from kvreuse.rope.spec import RopeSpec

transformers = pytest.importorskip("transformers")
qwen2_vl = pytest.importorskip("vllm.model_executor.models.qwen2_vl")
qwen2_5_vl = pytest.importorskip("vllm.model_executor.models.qwen2_5_vl")
from vllm.multimodal.inputs import (MultiModalFeatureSpec, MultiModalFieldElem, MultiModalKwargsItem,  # noqa: E402
                                    MultiModalSharedField, PlaceholderRange)

IMG, VID, VSTART, VEND = 7, 8, 4, 5
MERGE = 2


def _config(arch: str, tokens_per_second: int = 2):
    text = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                        "mrope_section": [4, 6, 6]})
    if arch == "qwen2_vl":
        return transformers.Qwen2VLConfig(text_config=text, vision_config=dict(depth=1, embed_dim=32, hidden_size=64,
                                                                               num_heads=2, spatial_merge_size=MERGE))
    return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=dict(
        depth=1, hidden_size=32, out_hidden_size=64, num_heads=2, spatial_merge_size=MERGE,
        tokens_per_second=tokens_per_second))


def _fn(arch: str):
    cls = qwen2_vl.Qwen2VLForConditionalGeneration if arch == "qwen2_vl" else \
        qwen2_5_vl.Qwen2_5_VLForConditionalGeneration
    return positions_fn_for(cls, _config(arch))


def _elem(x) -> MultiModalFieldElem:
    return MultiModalFieldElem(data=torch.as_tensor(x), field=MultiModalSharedField(batch_size=1))


class Item:
    """A media item: `kind` image/video, patch grid (t, h, w) before the spatial merge, seconds per grid step."""

    def __init__(self, ident: str, kind: str = "image", grid=(1, 8, 8), sec: float | None = None):
        self.ident, self.kind, self.grid, self.sec = ident, kind, grid, sec

    @property
    def llm_grid(self):
        t, h, w = self.grid
        return t, h // MERGE, w // MERGE

    @property
    def num_tokens(self) -> int:
        return math.prod(self.llm_grid)

    def feature(self, offset: int) -> MultiModalFeatureSpec:
        data = {f"{self.kind}_grid_thw": _elem(list(self.grid))}
        if self.sec is not None:
            data["second_per_grid_ts"] = _elem(self.sec)
        return MultiModalFeatureSpec(data=MultiModalKwargsItem(data), modality=self.kind, identifier=self.ident,
                                     mm_position=PlaceholderRange(offset=offset, length=self.num_tokens))


def build(parts) -> tuple[list[int], list[MultiModalFeatureSpec]]:
    """Prompt tokens and mm_features from a list of text token lists and `Item`s."""
    toks, feats = [], []
    for p in parts:
        if isinstance(p, Item):
            toks.append(VSTART)
            feats.append(p.feature(len(toks)))
            toks += [IMG if p.kind == "image" else VID] * p.num_tokens
            toks.append(VEND)
        else:
            toks += list(p)
    return toks, feats


def closed_form(parts, t_factor_of) -> torch.Tensor:
    """The derivation in `kvreuse.connector.mrope`'s docstring, written out independently."""
    cols, s = [], 0
    for p in parts:
        runs = [[VSTART], p, [VEND]] if isinstance(p, Item) else [p]
        for r in runs:
            if isinstance(r, Item):
                T, H, W = r.llm_grid
                f = t_factor_of(r)
                for t in range(T):
                    for h in range(H):
                        for w in range(W):
                            cols.append((s + int(t * f), s + h, s + w))
                s += max(int((T - 1) * f), H - 1, W - 1) + 1
            else:
                for i in range(len(r)):
                    cols.append((s + i,) * 3)
                s += len(r)
    return torch.tensor(cols, dtype=torch.int64).T


def words(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(40, 500) for _ in range(n)]


def _t_factor(arch: str):
    if arch == "qwen2_vl":
        return lambda it: 1.0  # Qwen2-VL's iter_mm_grid_thw ignores tokens_per_second unless set in the config
    return lambda it: (it.sec if it.sec is not None else 1.0) * 2 if it.kind == "video" else 1.0


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_closed_form_matches_model(arch):
    rng = random.Random(0)
    fn = _fn(arch)
    parts = [words(rng, 9), Item("a"), words(rng, 3), Item("b", grid=(1, 6, 10)), Item("c", grid=(1, 4, 4)),
             words(rng, 5), Item("v", "video", grid=(4, 8, 8), sec=1.5), words(rng, 7)]
    toks, feats = build(parts)
    got = fn(toks, feats)
    factor = _t_factor(arch)
    if arch == "qwen2_vl":
        # vLLM's Qwen2-VL reads tokens_per_second from the vision config when present (default 1)
        tps = getattr(_config(arch).vision_config, "tokens_per_second", 1.0)
        factor = lambda it: (it.sec if it.sec is not None else 1.0) * tps if it.kind == "video" else 1.0  # noqa
    assert torch.equal(got, closed_form(parts, factor))
    # text-only prompt: token indices on all three axes
    assert torch.equal(fn(toks[:9], []), text_positions(0, 9))


def test_image_16_tokens_advances_four_positions():
    toks, feats = build([[50, 51], Item("a"), [60]])
    pos = _fn("qwen2_vl")(toks, feats)
    assert feats[0].mm_position.length == 16
    img = pos[:, 3:19]
    assert img[0].tolist() == [3] * 16 and img[1].tolist() == [3 + i // 4 for i in range(16)]
    assert img[2].tolist() == [3 + i % 4 for i in range(16)]
    assert pos[:, 19].tolist() == [7, 7, 7]  # <|vision_end|>: 3 + max(0, 3, 3) + 1


def _chunk_positions(fn, parts, cfg):
    toks, feats = build(parts)
    pos = fn(toks, feats)
    chunks = segment(toks, cfg, spans=mm_spans(feats))
    out = {}
    for c in chunks:
        key = (tuple(toks[c.start:c.end]), c.mm_ids)
        out.setdefault(key, []).append(pos[:, c.start:c.end])
    return out, chunks, feats


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_whole_chunks_move_by_one_offset(arch):
    """Screenshots dropped, shifted and reordered, and a video moved: every chunk is a pure shift."""
    rng = random.Random(1)
    fn = _fn(arch)
    cfg = ChunkingConfig(min_tokens=4, avg_tokens=8, max_tokens=16)
    sys_ = words(rng, 20)
    shots = [Item(f"shot{i}", grid=(1, 8, 8) if i % 2 else (1, 6, 10)) for i in range(6)]
    video = Item("vid", "video", grid=(6, 8, 8), sec=0.5 if arch == "qwen2_5_vl" else None)
    q = [words(rng, 6) for _ in range(4)]
    layouts = [
        [sys_, shots[0], shots[1], shots[2], shots[3], q[0]],
        [sys_, shots[1], shots[2], shots[3], shots[4], q[1]],          # sliding window
        [sys_, shots[4], shots[2], video, shots[1], q[2]],             # reordered, a video in between
        [sys_, words(rng, 13), video, shots[4], q[3]],                 # video and screenshot shifted
    ]
    seen: dict = {}
    moved = 0
    for parts in layouts:
        per, chunks, feats = _chunk_positions(fn, parts, cfg)
        assert all(any(c.start == f.mm_position.offset and c.end == f.mm_position.offset + f.mm_position.length
                       for c in chunks) for f in feats), "each media item is exactly one chunk"
        for key, ps in per.items():
            for p in ps:
                if key in seen:
                    d = chunk_shift(seen[key], p)
                    assert d is not None, f"chunk {key[1] or key[0][:4]} did not move by one offset"
                    moved += d != 0
                else:
                    seen[key] = p
    assert moved >= 6


def test_video_keeps_temporal_arithmetic():
    fn = _fn("qwen2_5_vl")
    v = Item("vid", "video", grid=(6, 8, 8), sec=0.5)   # t factor = 0.5 * tokens_per_second (2) = 1.0
    w = Item("vid2", "video", grid=(6, 8, 8), sec=1.5)  # t factor 3.0: temporal positions 0, 3, 6, ...
    for it, step in ((v, 1), (w, 3)):
        toks, feats = build([[50] * 5, it, [60]])
        pos = fn(toks, feats)
        o = feats[0].mm_position.offset
        t_rows = pos[0, o:o + it.num_tokens].view(6, 16)   # 6 temporal groups of 4x4 merged patches
        assert (t_rows - t_rows[:, :1] == 0).all() and torch.equal(t_rows[:, 0] - o, torch.arange(6) * step)
        # after the item, text resumes at s + max(floor((T-1) f), H-1, W-1) + 1
        assert pos[0, o + it.num_tokens].item() == o + max(5 * step, 3) + 1


def test_relocated_keys_equal_direct_rotation():
    """K rotated at a chunk's src [3,T] positions and relocated to dst equals K rotated at dst."""
    fn = _fn("qwen2_vl")
    rope = RopeSpec.from_hf_config(_config("qwen2_vl").text_config)
    assert rope.mrope_section == (4, 6, 6)
    a, b = Item("a"), Item("b", grid=(1, 6, 10))
    t1, f1 = build([[50] * 7, a, [51] * 3, b, [52] * 4])
    t2, f2 = build([[50] * 30, b, [53] * 2, a, [52] * 4])
    p1, p2 = fn(t1, f1), fn(t2, f2)
    torch.manual_seed(0)
    raw = torch.randn(a.num_tokens, 1, 32, dtype=torch.float64)
    sa1 = slice(f1[0].mm_position.offset, f1[0].mm_position.offset + a.num_tokens)
    sa2 = slice(f2[1].mm_position.offset, f2[1].mm_position.offset + a.num_tokens)
    src, dst = p1[:, sa1], p2[:, sa2]
    assert chunk_shift(src, dst) not in (None, 0)
    zero = torch.zeros_like(src)
    k_src = relocate(raw, zero, src, rope)     # rotate from position 0 to src (= rope at src)
    k_dst = relocate(raw, zero, dst, rope)
    moved = relocate(k_src, src, dst, rope)
    assert torch.allclose(moved, k_dst, atol=1e-10)


def test_claim_and_save_carry_mrope_positions():
    fn = _fn("qwen2_vl")
    cfg = ChunkingConfig(min_tokens=4, avg_tokens=8, max_tokens=16)
    a, b = Item("a"), Item("b")
    t1, f1 = build([[50] * 10, a, [51] * 5, b, [52] * 6])
    t2, f2 = build([[50] * 10, b, [51] * 5, a, [52] * 6])
    d = Directory()
    for toks, feats in ((t1, f1),):
        pos = fn(toks, feats)
        ch = segment(toks, cfg, spans=mm_spans(feats))
        keys = chunk_keys(toks, ch, b"m" * 16, None)
        saves = plan_saves(toks, ch, keys, d, set(), True, pos)
        for s in saves:
            assert torch.equal(torch.tensor(s.positions), pos[:, s.start:s.end])
            d.record(s.key, s.end - s.start, s.context, s.recent)
    pos2 = fn(t2, f2)
    ch2 = segment(t2, cfg, spans=mm_spans(f2))
    keys2 = chunk_keys(t2, ch2, b"m" * 16, None)
    plan = plan_segments(t2, ch2, keys2, d, 0, "fast", pos2)
    assert plan.placed_tokens > 0
    for it in plan.items:
        assert torch.equal(torch.tensor(it.dst_pos), pos2[:, it.dst_start:it.dst_start + it.num_tokens])
    # a placement never starts or ends inside a media span
    for p in plan.placements:
        for f in f2:
            lo, hi = f.mm_position.offset, f.mm_position.offset + f.mm_position.length
            assert not lo < p.end < hi and not lo < p.start < hi
    # the keys of the same picture differ by identifier, not by offset
    img_keys = {c.mm_ids: k for c, k in zip(ch2, keys2) if c.mm_ids}
    assert img_keys[("a",)] != img_keys[("b",)]
