"""Multimodal connector pieces without a server (fast): identity, scheduler counts, worker M-RoPE placement."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from kvreuse.connector.claim import LoadItem, SaveItem, context_signature  # noqa: E402
from kvreuse.connector.config import ChunkingConfig, ConnectorConfig, PolicyConfig  # noqa: E402
from kvreuse.connector.metadata import KVReuseMetadata, ReqLoad, ReqSave  # noqa: E402
from kvreuse.connector.mrope import as_tuple  # noqa: E402
from kvreuse.connector.scheduler import SchedulerSide  # noqa: E402
from kvreuse.connector.worker import WorkerSide  # noqa: E402
from kvreuse.ops import relocate  # noqa: E402
from kvreuse.paged import block_slots, gather_kv, scatter_kv  # noqa: E402
from kvreuse.rope.spec import RopeSpec  # noqa: E402
from kvreuse.store import ChunkKey, ModelFingerprint  # noqa: E402
from test_mrope_positions import Item, _fn, build  # noqa: E402


def test_vllm_identity_of_pil_vs_data_url_bytes():
    """vLLM hashes a PIL image by its pixels and a data: URL by its encoded bytes (MediaWithBytes):
    the same picture gets two identities; the same bytes always get the same one.  kvreuse keys a media
    chunk by vLLM's identifier, so a re-sent identical data: URL is a hit and a re-encoded one is not
    (unless the client names it with a uuid, which then *is* the identifier)."""
    import numpy as np
    from PIL import Image
    from vllm.multimodal.hasher import MultiModalHasher
    from vllm.multimodal.media import MediaWithBytes

    a = np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    img = Image.fromarray(a)
    png = io.BytesIO()
    img.save(png, format="PNG")
    as_url = MediaWithBytes(Image.open(io.BytesIO(png.getvalue())), png.getvalue())
    again = MediaWithBytes(Image.open(io.BytesIO(png.getvalue())), png.getvalue())
    h = lambda x: MultiModalHasher.hash_kwargs("blake3", model_id="m", image=x)  # noqa: E731
    assert h(as_url) == h(again)
    assert h(img) != h(as_url)


def _request(rid, toks, feats, params=None):
    return SimpleNamespace(request_id=rid, prompt_token_ids=toks, mm_features=feats, kv_transfer_params=params,
                           cache_salt=None)


def test_scheduler_counts_encoder_inputs_and_reused_items():
    sched = SchedulerSide(ConnectorConfig(chunking=ChunkingConfig(min_tokens=4, avg_tokens=8, max_tokens=16),
                                          policy=PolicyConfig(fidelity="fast")),
                          b"m" * 16, frozenset(), positions_fn=_fn("qwen2_vl"))
    a, b, c = Item("a"), Item("b"), Item("c")
    t1, f1 = build([[50] * 10, a, [51] * 5, b, [52] * 6])
    r1 = _request("r1", t1, f1)
    assert sched.matched(r1, 0) == 0
    sched.after_alloc(r1, 0)
    out = SimpleNamespace(scheduled_new_reqs=[SimpleNamespace(req_id="r1", num_computed_tokens=0)],
                          scheduled_cached_reqs=SimpleNamespace(req_ids=[], num_computed_tokens=[]),
                          num_scheduled_tokens={"r1": len(t1)}, scheduled_encoder_inputs={"r1": [0, 1]})
    meta = sched.build_meta(out, lambda rid: [0, 1, 2])
    assert meta.saves and all(it.positions is not None for it in meta.saves[0].items)
    sched.finished(r1)
    # b and a again, shifted (a new image c first would end the claim, so c goes last)
    t2, f2 = build([[50] * 10, b, [51] * 5, a, [53] * 3, c, [52] * 6])
    r2 = _request("r2", t2, f2)
    n = sched.matched(r2, 0)
    # b, the text between and a are stored; the new text after a ends the claim: exactly at a's end
    assert n == f2[1].mm_position.offset + f2[1].mm_position.length
    sched.after_alloc(r2, n)
    out2 = SimpleNamespace(scheduled_new_reqs=[SimpleNamespace(req_id="r2", num_computed_tokens=n)],
                           scheduled_cached_reqs=SimpleNamespace(req_ids=[], num_computed_tokens=[]),
                           num_scheduled_tokens={"r2": len(t2) - n}, scheduled_encoder_inputs={"r2": [2]})
    meta2 = sched.build_meta(out2, lambda rid: [3, 4, 5, 6])
    pos = _fn("qwen2_vl")(t2, f2)
    for it in meta2.loads[0].items:
        assert it.dst_pos == as_tuple(pos[:, it.dst_start:it.dst_start + it.num_tokens])
    s = sched.take_stats()
    assert s.encoder_inputs == {"image": 3} and s.mm_items_reused == {"image": 2}


def test_positions_failure_disables_reuse_for_the_request():
    def broken(tokens, feats):
        raise RuntimeError("no grid")

    sched = SchedulerSide(ConnectorConfig(), b"m" * 16, frozenset(), positions_fn=broken)
    t, f = build([[50] * 10, Item("a"), [52] * 6])
    r = _request("r", t, f)
    assert sched.matched(r, 0) == 0
    out = SimpleNamespace(scheduled_new_reqs=[SimpleNamespace(req_id="r", num_computed_tokens=0)],
                          scheduled_cached_reqs=SimpleNamespace(req_ids=[], num_computed_tokens=[]),
                          num_scheduled_tokens={"r": len(t)}, scheduled_encoder_inputs={})
    assert not sched.build_meta(out, lambda rid: [0, 1]).saves


H, D, BS, NB, L = 1, 32, 16, 8, 2
ROPE = RopeSpec(rotary_dim=D, inv_freq=1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)),
                mrope_section=(4, 6, 6))


def _worker():
    w = WorkerSide(ConnectorConfig(), ROPE, ModelFingerprint("TinyVL", "w", "float32"))
    caches = {f"model.layers.{i}.self_attn.attn": torch.zeros(NB, H, BS, 2 * D) for i in range(L)}
    w.register(caches, "CPU_ATTN", H, D)
    return w, caches


def test_worker_places_an_image_by_its_mrope_positions():
    """Save an image chunk with its [3, T] positions; load it elsewhere; keys = relocation src -> dst."""
    fn = _fn("qwen2_vl")
    a = Item("a")
    t1, f1 = build([[50] * 7, a, [52] * 6])
    t2, f2 = build([[50] * 30, Item("b"), [51] * 3, a, [52] * 6])
    p1, p2 = fn(t1, f1), fn(t2, f2)
    o1, o2, n = f1[0].mm_position.offset, f2[1].mm_position.offset, a.num_tokens
    w, caches = _worker()
    k, v = torch.randn(L, n, H, D), torch.randn(L, n, H, D)
    blocks1, blocks2 = [2, 5], [0, 1, 3, 4, 6]
    slots1 = block_slots(blocks1, BS, o1, o1 + n)
    for i, name in enumerate(caches):
        scatter_kv(caches[name], w.spec, k[i], v[i], slots1)
    toks, key = tuple(t1[o1:o1 + n]), b"i" * 16
    w.save(KVReuseMetadata(saves=[ReqSave("r1", blocks1, [SaveItem(key, toks, o1, o1 + n, context_signature(()), True,
                                                                   as_tuple(p1[:, o1:o1 + n]))])]))
    w.store.flush()
    entry_pos = w.store.fetch(ChunkKey(key), list(toks)).result().positions
    assert torch.equal(entry_pos, p1[:, o1:o1 + n]), "stored entries keep [3, T] positions"
    item = LoadItem(key, toks, 0, n, o2, context_signature(()), "blind", as_tuple(p2[:, o2:o2 + n]))
    w.start_load(KVReuseMetadata(loads=[ReqLoad("r2", blocks2, [item], fidelity="fast")]))
    for name in caches:
        w.load_layer(name)
    slots2 = block_slots(blocks2, BS, o2, o2 + n)
    for i, name in enumerate(caches):
        gk, gv = gather_kv(caches[name], w.spec, slots2)
        torch.testing.assert_close(gk, relocate(k[i], p1[:, o1:o1 + n], p2[:, o2:o2 + n], ROPE), atol=1e-5,
                                   rtol=1e-5)
        torch.testing.assert_close(gv, v[i])
    # a destination that is not one shift of the stored positions is refused (recomputed), never served
    bad = p2[:, o2:o2 + n].clone()
    bad[1] = bad[0]
    w.start_load(KVReuseMetadata(loads=[ReqLoad("r3", blocks2, [LoadItem(key, toks, 0, n, o2, context_signature(()),
                                                                         "blind", as_tuple(bad))], fidelity="fast")]))
    assert w.take_failed_blocks() and w.take_report().lost_keys == [key]
    w.close()
