"""Restart-warm persistence and disk faults.

* Every chunk stored in memory reaches disk in the background (write-behind), so a process
  killed with SIGKILL leaves its chunks on disk, served bit-exact after a restart.
* `scan_index` rebuilds a scheduler's directory from headers alone (token counts, context
  signatures, their preceding keys), with tensor-parallel ranks intersected.
* A disk that fills up or turns read-only during spills — also spills forced by a load making
  room — costs misses and counted errors, never an exception.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import torch

from kvreuse.store import ChunkStore, ModelFingerprint, StoreConfig
from kvreuse.store.tiers.disk import scan_index
from tests.store.conftest import FP, make_entry
from tests.support.small_fs import read_only, small_disk

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SERVER = textwrap.dedent("""
    import sys, time, torch
    torch.set_num_threads(1)
    from kvreuse.store import ChunkStore, StoreConfig
    from tests.store.conftest import FP, make_entry
    path, n = sys.argv[1], int(sys.argv[2])
    store = ChunkStore(StoreConfig(host_bytes=1 << 26, disk_path=path, disk_bytes=1 << 26), FP)
    for s in range(n):
        e = make_entry(s)
        e.preceding = {e.context: tuple(bytes([s, j]) * 8 for j in range(s % 3))}
        assert store.put(e)
    store.flush()  # the background writes have landed; nothing was ever evicted from memory
    print("ready", flush=True)
    time.sleep(600)
""")


def test_chunks_kept_in_memory_survive_sigkill(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen([sys.executable, "-c", SERVER, str(tmp_path), "12"], stdout=subprocess.PIPE, cwd=ROOT,
                         env=env, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        # while it runs (holding the directory), a scheduler indexes what is on disk
        recs = {r.key: r for r in scan_index(str(tmp_path), FP.digest)}
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    entries = [make_entry(s) for s in range(12)]
    assert set(recs) == {e.key.digest for e in entries}
    for s, e in enumerate(entries):
        r = recs[e.key.digest]
        assert r.num_tokens == e.num_tokens and r.contexts == (e.context,)
        assert r.preceding == {e.context: tuple(bytes([s, j]) * 8 for j in range(s % 3))}
    with ChunkStore(StoreConfig(host_bytes=1 << 26, disk_path=str(tmp_path), disk_bytes=1 << 26), FP) as store:
        assert len(store.disk) == 12
        for e in entries:
            h = store.fetch(e.key, e.token_ids)
            assert h is not None and h.source == "disk"
            out = h.result(timeout=30)
            assert torch.equal(out.k, e.k) and torch.equal(out.v, e.v)
        assert store.snapshot_stats().failed_loads == 0


def test_scan_index_intersects_ranks_and_skips_damage(tmp_path):
    r0 = ModelFingerprint("TestArch", "w", "bfloat16", tp_rank=0, tp_size=2)
    r1 = r0.for_rank(1)
    both, only0, bad = make_entry(1, model=r0), make_entry(2, model=r0), make_entry(3, model=r0)
    cfg = StoreConfig(host_bytes=1 << 22, disk_path=str(tmp_path), disk_bytes=1 << 22)
    with ChunkStore(cfg, r0) as s0, ChunkStore(cfg, r1) as s1:
        for e in (both, only0, bad):
            s0.put(e)
        for e in (both, bad):
            s1.put(e)
        s0.flush(), s1.flush()
        bad_path = s0.disk.path(bad.key)
    with open(bad_path, "r+b") as f:
        f.seek(30)
        f.write(b"\xff")  # inside the header
    digests = [f.digest for f in r0.all_ranks()]
    assert [r.key for r in scan_index(str(tmp_path), digests)] == [both.key.digest]
    assert {r.key for r in scan_index(str(tmp_path), r0.digest)} == {both.key.digest, only0.key.digest}
    assert list(scan_index(str(tmp_path / "nowhere"), digests)) == []


def _entries(n: int) -> list:
    return [make_entry(s, layers=4, tokens=64, heads=2, dim=64) for s in range(n)]  # 128 KiB of KV each


def test_disk_full_or_read_only_during_spills_is_only_misses(tmp_path):
    entries = _entries(14)
    one = entries[0].nbytes
    with small_disk(str(tmp_path / "disk"), 1 << 20) as (path, kind):
        # the budget says 64 MiB; the filesystem holds 1 MiB (tmpfs), or no file may pass 64 KiB (fsize)
        cfg = StoreConfig(host_bytes=3 * one, disk_path=path, disk_bytes=64 << 20)
        with ChunkStore(cfg, FP) as store:
            for e in entries:
                store.put(e)  # evictions spill to disk; write-behind copies too
            store.flush()
            s = store.snapshot_stats()
            assert s.tiers["disk"].errors > 0
            on_disk = [e for e in entries if e.key in store.disk]
            for e in entries:  # loads from disk make room in memory: more spills into the full disk
                v = store.get(e.key, e.token_ids, timeout=30)
                assert v is None or torch.equal(v.k, e.k)
            store.flush()
            assert sum(store.get(e.key, e.token_ids, timeout=30) is not None for e in on_disk) == len(on_disk)
            with read_only(path, kind):
                more = [make_entry(100 + s, layers=4, tokens=64, heads=2, dim=64) for s in range(6)]
                for e in more:
                    store.put(e)
                for e in on_disk[:2]:
                    store.remove(e.key)  # the unlink fails quietly; the index forgets the entry
                    assert store.get(e.key, e.token_ids) is None
                store.flush()
                for e in entries + more:
                    v = store.get(e.key, e.token_ids, timeout=30)
                    assert v is None or torch.equal(v.k, e.k)
                store.flush()
                assert store.snapshot_stats().tiers["disk"].errors > s.tiers["disk"].errors
