"""A writer killed with SIGKILL mid-write leaves every completed entry intact and no broken one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import torch

from kvreuse.store import ChunkStore, StoreConfig
from tests.store.conftest import FP, make_entry

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPE = dict(layers=8, tokens=512, heads=4, dim=64)  # 4 MiB per entry: writes take long enough to catch

WRITER = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from kvreuse.store import ChunkStore, StoreConfig
    from tests.store.conftest import FP, make_entry
    start, path = int(sys.argv[1]), sys.argv[2]
    store = ChunkStore(StoreConfig(disk_path=path, disk_bytes=1 << 40), FP)
    for seed in range(start, start + 10_000):
        store.put(make_entry(seed, **%r))
        print(seed, flush=True)
""" % SHAPE)


def _kill_mid_write(path: str, start: int) -> list[int]:
    """Run a writer, wait for a few completed puts, SIGKILL it while a temporary file exists."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(start), path], stdout=subprocess.PIPE,
                         cwd=ROOT, env=env, text=True)
    done = []
    try:
        while len(done) < 3:
            line = p.stdout.readline()
            assert line, "writer died"
            done.append(int(line))
        sub = os.path.join(path, FP.digest.hex())
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(f.endswith(".tmp") for f in os.listdir(sub)):
            pass
        saw_tmp = any(f.endswith(".tmp") for f in os.listdir(sub))
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        assert saw_tmp, "never caught the writer mid-write"
        done += [int(x) for x in p.stdout.read().split()]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return done


def test_sigkill_mid_write_keeps_intact_entries_only(tmp_path):
    path = str(tmp_path)
    completed: list[int] = []
    partial = 0
    for round_ in range(3):
        completed += _kill_mid_write(path, start=1000 * round_)
        sub = os.path.join(path, FP.digest.hex())
        partial += any(f.endswith(".tmp") for f in os.listdir(sub))  # the rename may beat the kill
        with ChunkStore(StoreConfig(disk_path=path, disk_bytes=1 << 40), FP) as store:
            assert not any(f.endswith(".tmp") for f in os.listdir(sub))
            indexed = {k for k in store.disk.index}
            for seed in completed:  # every put that returned is there, bit-exact
                e = make_entry(seed, **SHAPE)
                assert e.key in indexed
                v = store.get(e.key, e.token_ids, timeout=60)
                assert v is not None and torch.equal(v.k, e.k) and torch.equal(v.v, e.v)
            # and nothing else but possibly the entry whose rename beat the kill
            assert len(indexed) - len(completed) in (0, 1)
            assert store.snapshot_stats().failed_loads == 0
    assert partial, "no kill of three left a partial file to clean up"
