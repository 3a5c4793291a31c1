"""Keys that never cross: entries made under one model identity, adapter or rank are never served under another.

Each identity dimension (weights, KV cache dtype, quantization, TP rank and size, PP rank, LoRA
adapter) gives other keys, and an entry planted under a foreign fingerprint is refused by its
header — on disk and in Redis.  With tensor parallelism, ranks sharing one Redis keep their own
entries (names carry each rank's fingerprint).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import struct
import time

import pytest
import torch

from kvreuse.store import ChunkKey, ChunkStore, ModelFingerprint, StoreConfig
from kvreuse.store.keys import AdapterKeys, adapter_identity, checkpoint_identity
from tests.store.conftest import FP, make_entry
from tests.support.hub_cache import put_snapshot

VARIANTS = {
    "weights": dict(weights_id="weights-sha256-9"),
    "kv_cache_dtype": dict(kv_cache_dtype="fp8_e4m3"),
    "quantization": dict(quantization="awq"),
    "tp_rank": dict(tp_rank=1, tp_size=2),
    "tp_size": dict(tp_size=2),
    "pp_rank": dict(pp_rank=1, pp_size=2),
    "pp_size": dict(pp_size=2),
}


@pytest.mark.parametrize("dim", sorted(VARIANTS))
def test_every_identity_dimension_changes_fingerprint_and_keys(dim):
    other = dataclasses.replace(FP, **VARIANTS[dim])
    assert other.digest != FP.digest
    ids = [5, 6, 7]
    assert ChunkKey.of(other, ids) != ChunkKey.of(FP, ids)


@pytest.mark.parametrize("dim", sorted(VARIANTS))
def test_disk_entries_of_one_identity_are_never_served_under_another(tmp_path, dim):
    other = dataclasses.replace(FP, **VARIANTS[dim])
    cfg = StoreConfig(disk_path=str(tmp_path), disk_bytes=1 << 20)
    mine = make_entry(1)
    with ChunkStore(cfg, FP) as store:
        assert store.put(mine)
        store.flush()
        src = store.disk.path(mine.key)
    with ChunkStore(cfg, other) as store:
        # the same tokens are another key under the other identity: a plain miss
        assert store.get(ChunkKey.of(other, mine.token_ids), mine.token_ids) is None
        # our file planted in its directory under the very key asked for: refused by its header, removed
        dst = store.disk.path(mine.key)
        shutil.copyfile(src, dst)
    with ChunkStore(cfg, other) as store:
        assert store.get(mine.key, mine.token_ids) is None and not os.path.exists(dst)
    with ChunkStore(cfg, FP) as store:  # and ours is still served to us
        v = store.get(mine.key, mine.token_ids, timeout=30)
        assert v is not None and torch.equal(v.k, mine.k)


def test_lora_adapters_get_their_own_keys(tmp_path):
    ids = [1, 2, 3, 4]
    a = (tmp_path / "a")
    a.mkdir()
    (a / "adapter_model.safetensors").write_bytes(_safetensors(b"\x01" * 64))
    (a / "adapter_config.json").write_text('{"r": 8}')
    keys = {ChunkKey.of(FP, ids), ChunkKey.of(FP, ids, lora=adapter_identity("sql", a)),
            ChunkKey.of(FP, ids, lora=adapter_identity("chat", a)), ChunkKey.of(FP, ids, lora=b""),
            ChunkKey.of(FP, ids, cache_salt="sql")}
    assert len(keys) == 5
    # an adapter retrained in place (same name, same path): other weights, other keys
    before = adapter_identity("sql", a)
    (a / "adapter_model.safetensors").write_bytes(_safetensors(b"\x02" * 64))
    assert adapter_identity("sql", a) != before
    # vLLM's own LoRARequest, as the scheduler sees it on a request
    from vllm.lora.request import LoRARequest

    cache = AdapterKeys()
    r1, r2 = LoRARequest("sql", 1, str(a)), LoRARequest("chat", 2, str(a))
    assert cache.of(None) is None
    assert cache.of(r1) == adapter_identity("sql", a) != cache.of(r2)
    assert cache.of(LoRARequest("sql", 7, str(a))) == cache.of(r1)  # the engine-local int id is not identity


def test_lora_entries_are_never_served_to_another_adapter_or_the_base_model(tmp_path):
    cfg = StoreConfig(host_bytes=1 << 20)
    e = make_entry(3)
    with ChunkStore(cfg, FP) as store:
        keyed = dataclasses.replace(e, key=ChunkKey.of(FP, e.token_ids, lora=adapter_identity("sql", None)))
        assert store.put(keyed)
        assert store.get(ChunkKey.of(FP, e.token_ids), e.token_ids) is None
        assert store.get(ChunkKey.of(FP, e.token_ids, lora=adapter_identity("chat", None)), e.token_ids) is None
        assert store.get(keyed.key, e.token_ids) is not None


def _safetensors(data: bytes, shape=(16,)) -> bytes:
    head = b'{"w":{"dtype":"F32","shape":[%d],"data_offsets":[0,%d]}}' % (shape[0], len(data))
    return struct.pack("<Q", len(head)) + head + data


def test_checkpoint_identity_sees_weights_changed_in_place(tmp_path):
    ck = tmp_path / "ckpt"
    ck.mkdir()
    (ck / "config.json").write_text('{"hidden_size": 4}')
    (ck / "model.safetensors").write_bytes(_safetensors(bytes(range(64))))
    ident = checkpoint_identity(ck)
    assert ident is not None and ident == checkpoint_identity(ck)
    copy = tmp_path / "copy"
    shutil.copytree(ck, copy)
    assert checkpoint_identity(copy) != ident  # other files (inodes): not known to hold the same bytes
    content = checkpoint_identity(ck, stamps=False)
    assert checkpoint_identity(copy, stamps=False) == content  # the same content
    os.rename(ck, tmp_path / "renamed")  # the same files moved: the same identity (a restart stays warm)
    assert checkpoint_identity(tmp_path / "renamed") == ident
    os.rename(tmp_path / "renamed", ck)
    # same names, sizes and header, other tensor bytes (a fine-tune written in place)
    (ck / "model.safetensors").write_bytes(_safetensors(bytes(reversed(range(64)))))
    assert checkpoint_identity(ck) != ident and checkpoint_identity(ck, stamps=False) != content
    (copy / "config.json").write_text('{"hidden_size": 5}')
    assert checkpoint_identity(copy, stamps=False) != content
    assert checkpoint_identity(tmp_path / "missing") is None
    (tmp_path / "empty").mkdir()
    assert checkpoint_identity(tmp_path / "empty") is None


def _rewrite_in_place(path, offset: int, data: bytes) -> None:
    """Overwrite bytes of ``path`` in place, as a partial save does (same file, same size)."""
    time.sleep(0.05)  # file timestamps are coarse: a rewrite within a few ms of the last write may keep the mtime
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_checkpoint_identity_sees_a_rewrite_the_samples_miss(tmp_path):
    ck = tmp_path / "ckpt"
    ck.mkdir()
    tensor = bytes(range(256)) * 1024  # 256 KiB: a few sampled 4 KiB blocks leave most of it unread
    st = ck / "model.safetensors"
    st.write_bytes(_safetensors(tensor, shape=(len(tensor) // 4,)))
    content, ident, size = checkpoint_identity(ck, stamps=False), checkpoint_identity(ck), st.stat().st_size
    _rewrite_in_place(st, size - len(tensor) + len(tensor) // 14, b"\xff" * 64)  # between two samples
    assert st.stat().st_size == size and checkpoint_identity(ck, stamps=False) == content  # the samples miss it
    changed = checkpoint_identity(ck)
    assert changed != ident
    # the same bytes saved as a new file that replaces the old one (how most tools save): another inode
    (ck / "new").write_bytes(st.read_bytes())
    os.replace(ck / "new", st)
    assert checkpoint_identity(ck) not in (ident, changed)
    assert checkpoint_identity(ck) == checkpoint_identity(ck)  # stable while nothing changes


def test_one_weight_file_is_a_checkpoint(tmp_path):
    gguf = tmp_path / "model.Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 512)
    ident = checkpoint_identity(gguf)
    assert ident is not None and ident == checkpoint_identity(gguf)
    _rewrite_in_place(gguf, 64 * 1024, b"\x00" * 16)
    assert checkpoint_identity(gguf) != ident
    (tmp_path / "notes.txt").write_text("not weights")
    assert checkpoint_identity(tmp_path / "notes.txt") is None


def test_a_local_lora_rewritten_in_place_gets_other_keys(tmp_path):
    """vLLM reloads an adapter whose files changed (`load_inplace`); its keys follow the files."""
    from vllm.lora.request import LoRARequest

    a = tmp_path / "a"
    a.mkdir()
    st = a / "adapter_model.safetensors"
    tensor = bytes(range(256)) * 256
    st.write_bytes(_safetensors(tensor, shape=(len(tensor) // 4,)))
    keys, r = AdapterKeys(), LoRARequest("sql", 1, str(a))
    before = keys.of(r)
    assert keys.of(r) == before
    content = checkpoint_identity(a, stamps=False)
    _rewrite_in_place(st, st.stat().st_size - len(tensor) + 6000, b"\xff" * 64)  # the same size
    assert checkpoint_identity(a, stamps=False) == content  # between the sampled blocks
    assert keys.of(r) != before


def test_a_hub_lora_is_keyed_by_its_files_in_the_local_cache(tmp_path, monkeypatch):
    """A LoRA named by a hub id is keyed by the snapshot vLLM loads (resolved in the local cache, never over the
    network): another revision, other keys; the same revision in another host's cache, the same keys; one not
    in the cache gets no key (the request is served without kvreuse)."""
    import huggingface_hub.constants
    from vllm.lora.request import LoRARequest

    from kvreuse.store.keys import AdapterUnresolved

    v1 = {"adapter_model.safetensors": _safetensors(b"\x01" * 64), "adapter_config.json": b'{"r": 8}'}
    v2 = {"adapter_model.safetensors": _safetensors(b"\x02" * 64), "adapter_config.json": b'{"r": 8}'}
    host1, host2 = tmp_path / "host1", tmp_path / "host2"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(host1))
    put_snapshot(host1, "org/sql-lora", v1, "1" * 40)
    keys, r = AdapterKeys(), LoRARequest("sql", 1, "org/sql-lora")
    first = keys.of(r)
    assert first == adapter_identity("sql", "org/sql-lora") and keys.of(LoRARequest("sql", 7, "org/sql-lora")) == first
    put_snapshot(host1, "org/sql-lora", v2, "2" * 40)  # vLLM downloaded a newer revision
    second = keys.of(r)
    assert second != first
    time.sleep(0.05)
    put_snapshot(host2, "org/sql-lora", v2, "2" * 40)  # another host: its own blobs, other mtimes and inodes
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(host2))
    assert AdapterKeys().of(r) == second
    with pytest.raises(AdapterUnresolved, match="org/not-downloaded"):
        keys.of(LoRARequest("chat", 2, "org/not-downloaded"))


def test_checkpoint_identity_reads_little_of_a_large_file(tmp_path):
    ck = tmp_path / "big"
    ck.mkdir()
    with open(ck / "model.safetensors", "wb") as f:
        f.write(_safetensors(b"", shape=(0,)))
        f.truncate(2 << 30)  # 2 GiB sparse: reading it whole would take seconds
    import time

    t0 = time.perf_counter()
    assert checkpoint_identity(ck) is not None
    assert time.perf_counter() - t0 < 0.5


def test_tp_ranks_sharing_redis_keep_their_own_entries(redis_server):
    """Rank 0 and rank 1 save the same chunk (same key, their own heads); neither evicts or shadows the other."""
    r0 = ModelFingerprint("TestArch", "w", "bfloat16", tp_rank=0, tp_size=2)
    r1 = r0.for_rank(1)
    cfg = StoreConfig(redis_url=redis_server.url, redis_bytes=1 << 24)
    key_fp = r0  # the scheduler names chunks with rank 0's fingerprint
    e = make_entry(4, model=key_fp)
    heads1 = dataclasses.replace(e, k=e.k + 1, v=e.v - 1)
    with ChunkStore(cfg, r0) as s0, ChunkStore(cfg, r1) as s1:
        assert s0.put(e) and s1.put(heads1)
        s0.flush(), s1.flush()
        assert s0.redis.entry_name(e.key) != s1.redis.entry_name(e.key)
    with ChunkStore(cfg, r0) as s0, ChunkStore(cfg, r1) as s1:
        v0, v1 = s0.get(e.key, e.token_ids, timeout=30), s1.get(e.key, e.token_ids, timeout=30)
        assert v0 is not None and torch.equal(v0.k, e.k)
        assert v1 is not None and torch.equal(v1.k, heads1.k)
        assert s0.snapshot_stats().failed_loads == 0 and s1.snapshot_stats().failed_loads == 0


def test_scheduler_keys_requests_by_adapter(tmp_path):
    """The scheduler's chunk keys of vLLM requests differ by LoRA adapter (and not by its engine-local int id)."""
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.v1.request import Request

    from kvreuse.connector.config import ConnectorConfig
    from kvreuse.connector.scheduler import SchedulerSide

    a = tmp_path / "adapter"
    a.mkdir()
    (a / "adapter_model.safetensors").write_bytes(_safetensors(b"\x03" * 64))
    sched = SchedulerSide(ConnectorConfig(), FP.digest, frozenset())
    tokens = list(range(100, 400))

    def keys(rid, lora=None, salt=None):
        r = Request(rid, tokens, SamplingParams(max_tokens=1), None, lora_request=lora, cache_salt=salt)
        sched.matched(r, 0)
        return sched.reqs[rid].keys

    base, sql, chat = keys("b"), keys("s", LoRARequest("sql", 1, str(a))), keys("c", LoRARequest("chat", 2, str(a)))
    assert len(base) > 1 and len({*base, *sql, *chat}) == 3 * len(base)
    assert keys("s2", LoRARequest("sql", 9, str(a))) == sql
    assert not set(keys("salted", salt="t")) & {*base, *sql}
