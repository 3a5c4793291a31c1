"""Persistence: bit-exact round trips; corrupt, truncated and foreign-model files are misses and removed."""

from __future__ import annotations

import os

import pytest
import torch

from kvreuse import fit_patch
from kvreuse.store import ChunkStore, EntryCorrupt, StoreConfig
from kvreuse.store.persist import decode, encode
from kvreuse.patch import Patch
from tests.store.conftest import FP, OTHER_FP, make_entry

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view, so that NaN payloads and -0.0 compare exactly too."""
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def rich_entry(seed: int, dtype: torch.dtype, mrope: bool = False):
    e = make_entry(seed, dtype=dtype, mrope=mrope, layers=3, tokens=7, heads=3, dim=10)
    g = torch.Generator().manual_seed(seed + 1)
    ck = (e.k.float() + 0.1 * torch.randn(e.k.shape, generator=g)).to(dtype)
    cv = (e.v.float() + 0.1 * torch.randn(e.v.shape, generator=g)).to(dtype)
    e.add_context_kv(b"ctx-A", ck, cv)
    e.add_patch(b"ctx-B", fit_patch(ck.float() - e.k.float(), cv.float() - e.v.float(), max_rank=3, dtype=dtype))
    e.k[0, 0, 0, :3] = torch.tensor([float("nan"), -0.0, float("inf")], dtype=dtype)
    e.recompute_cost, e.hits = 0.125, 5
    return e


def assert_same(a, b, *, hits_added: int = 0):
    assert a.key == b.key and a.context == b.context and a.recompute_cost == b.recompute_cost
    assert b.hits == a.hits + hits_added
    assert torch.equal(a.token_ids, b.token_ids) and torch.equal(a.positions, b.positions)
    assert a.k.dtype == b.k.dtype and torch.equal(bits(a.k), bits(b.k)) and torch.equal(bits(a.v), bits(b.v))
    assert a.in_context.keys() == b.in_context.keys()
    for c in a.in_context:
        for x, y in zip(a.in_context[c], b.in_context[c]):
            assert torch.equal(bits(x), bits(y))
    assert a.patches.keys() == b.patches.keys()
    for c in a.patches:
        sa, sb = a.patches[c].state_dict(), b.patches[c].state_dict()
        assert sa.keys() == sb.keys()
        for n in sa:
            assert sa[n].dtype == sb[n].dtype and torch.equal(bits(sa[n]), bits(sb[n])), n


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mrope", [False, True])
def test_codec_round_trip_is_bit_exact(dtype, mrope):
    e = rich_entry(3, dtype, mrope)
    out = decode(encode(e, FP.digest), model=FP.digest, key=e.key, patch_from_state_dict=Patch.from_state_dict)
    assert_same(e, out)


@pytest.mark.parametrize("dtype", DTYPES)
def test_disk_round_trip_across_reopen_is_bit_exact(tmp_path, dtype):
    cfg = StoreConfig(disk_path=str(tmp_path), disk_bytes=1 << 20)
    entries = [rich_entry(s, dtype, mrope=s % 2 == 1) for s in range(4)]
    with ChunkStore(cfg, FP) as store:
        for e in entries:
            assert store.put(e)
    with ChunkStore(cfg, FP) as store:
        assert len(store.disk) == 4
        for e in entries:
            h = store.fetch(e.key, e.token_ids)
            assert h is not None and h.source == "disk"
            assert_same(e, h.result(timeout=30), hits_added=1)


def _files(store_dir):
    return sorted(os.path.join(store_dir, f) for f in os.listdir(store_dir) if f.endswith(".kvc"))


def _damage(path: str, how: str) -> None:
    data = bytearray(open(path, "rb").read())
    if how == "flip_payload":
        data[-5] ^= 0x40
    elif how == "flip_header":
        data[30] ^= 0x01
    elif how == "truncate":
        data = data[: len(data) - 17]
    elif how == "empty":
        data = bytearray()
    elif how == "garbage":
        data = bytearray(b"not a kvreuse entry" * 10)
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("how", ["flip_payload", "flip_header", "truncate", "empty", "garbage"])
def test_damaged_files_are_never_served(tmp_path, how):
    """A bad header or size is caught when the directory is indexed; a bad payload when it is read."""
    cfg = StoreConfig(disk_path=str(tmp_path), disk_bytes=1 << 20)
    entries = [make_entry(s) for s in range(3)]
    with ChunkStore(cfg, FP) as store:
        for e in entries:
            store.put(e)
        d = store.disk.dir
    victim = _files(d)[1]
    _damage(victim, how)
    with ChunkStore(cfg, FP) as store:
        at_open = how != "flip_payload"  # start-up reads headers only
        assert os.path.exists(victim) != at_open
        assert store.snapshot_stats().tiers["disk"].dropped_corrupt == int(at_open)
        served = [store.get(e.key, e.token_ids, timeout=30) for e in entries]
        assert sum(v is None for v in served) == 1  # a miss, not an error
        for e, v in zip(entries, served):
            if v is not None:
                assert torch.equal(v.k, e.k)
        assert not os.path.exists(victim) and store.snapshot_stats().tiers["disk"].dropped_corrupt == 1


def test_file_damaged_after_open_is_a_miss_and_removed(tmp_path):
    cfg = StoreConfig(disk_path=str(tmp_path), disk_bytes=1 << 20)
    e = make_entry(5)
    with ChunkStore(cfg, FP) as store:
        store.put(e)
        (path,) = _files(store.disk.dir)
        _damage(path, "flip_payload")  # the segment checksum catches it during the load
        assert store.get(e.key, e.token_ids, timeout=30) is None
        assert not os.path.exists(path) and e.key not in store.disk
        s = store.snapshot_stats()
        assert s.failed_loads == 1 and s.tiers["disk"].dropped_corrupt == 1
        assert store.get(e.key, e.token_ids) is None and store.contains(e.key) is None


def test_foreign_model_files_are_never_served(tmp_path):
    cfg = StoreConfig(disk_path=str(tmp_path), disk_bytes=1 << 20)
    theirs = make_entry(1, model=OTHER_FP)
    with ChunkStore(cfg, OTHER_FP) as store:
        store.put(theirs)
        their_dir = store.disk.dir
    # Same token ids under our fingerprint: another key, so a plain miss.
    with ChunkStore(cfg, FP) as store:
        assert len(store.disk) == 0 and store.get(theirs.key, theirs.token_ids) is None
        # A foreign file planted in our directory under the very key asked for: dropped, never served.
        (src,) = _files(their_dir)
        dst = os.path.join(store.disk.dir, os.path.basename(src))
        os.link(src, dst)
    with ChunkStore(cfg, FP) as store:
        assert not os.path.exists(dst) and store.get(theirs.key, theirs.token_ids) is None
    assert os.path.exists(src)  # the other model's own directory is left alone
    with ChunkStore(cfg, OTHER_FP) as store:
        assert store.get(theirs.key, theirs.token_ids) is not None


def test_decode_rejects_every_single_byte_flip_in_the_header():
    e = make_entry(2, layers=1, tokens=2, heads=1, dim=4)
    blob = bytearray(encode(e, FP.digest))
    from kvreuse.store.persist import PREFIX_BYTES, header_length
    end = PREFIX_BYTES + header_length(bytes(blob[:PREFIX_BYTES]))
    for i in range(0, end):
        bad = bytearray(blob)
        bad[i] ^= 0x10
        with pytest.raises(EntryCorrupt):
            decode(bytes(bad), model=FP.digest, key=e.key)
    with pytest.raises(EntryCorrupt):
        decode(bytes(blob), model=OTHER_FP.digest, key=e.key)


def test_disk_directory_has_one_owner(tmp_path):
    cfg = StoreConfig(disk_path=str(tmp_path), disk_bytes=1 << 20)
    with ChunkStore(cfg, FP):
        with pytest.raises(ValueError, match="disk_path"):
            ChunkStore(cfg, FP)
