"""CUDA paths of the store: device tier on the GPU, pinned host tier, disk loads into GPU memory."""

from __future__ import annotations

import pytest
import torch

from kvreuse import fit_patch
from kvreuse.store import ChunkStore, StoreConfig
from tests.store.conftest import FP, make_entry

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_tiers_on_gpu(tmp_path):
    entries = [make_entry(s, layers=3, tokens=32) for s in range(6)]
    one = entries[0].nbytes
    cfg = StoreConfig(device_bytes=2 * one, host_bytes=2 * one, disk_path=str(tmp_path), disk_bytes=1 << 24)
    with ChunkStore(cfg, FP) as store:
        dev, host = store.memory
        assert dev.device.type == "cuda" and host.pin
        a = entries[0]
        ck, cv = (a.k.float() * 1.01).to(a.k.dtype), (a.v.float() * 0.99).to(a.v.dtype)
        store.put(a)
        store.add_patch(a.key, b"ctx", fit_patch(ck.float() - a.k.float(), cv.float() - a.v.float(), max_rank=2,
                                                dtype=a.k.dtype))
        for e in entries[1:]:
            store.put(e)
        assert all(e.k.is_pinned() for e in host.entries.values())
        assert all(e.k.is_cuda for e in dev.entries.values())
        assert a.key in store.disk
        for e in entries:
            h = store.fetch(e.key, e.token_ids)
            got = h.result(30)
            assert got.k.is_cuda and torch.equal(got.k.cpu(), e.k) and torch.equal(got.v.cpu(), e.v)
        v = store.get(a.key, a.token_ids, context=b"ctx")
        assert v.how == "patched" and v.k.is_cuda
