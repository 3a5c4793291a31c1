"""Start-up time of a disk tier against the bytes it holds (restart-warm persistence, issue 12).

Fills a disk directory with real entry files (the store's own format; every file a distinct key
and token ids, payloads of ``--entry-mib``) up to each size in ``--sizes-gib``, then times:

* ``open``: ``ChunkStore`` construction with that disk tier (it indexes every file from its
  header) plus ``close``;
* ``scan``: ``scan_index`` over the directory (what a scheduler runs to rebuild its directory).

Each is timed ``--reps`` times "cold" (every file's pages dropped with ``posix_fadvise(DONTNEED)``
before the run; directory and inode caches stay warm: dropping those needs root on the host) and
"warm".  Prints medians and the per-entry cost.  The directory is deleted at the end unless
``--keep``.

    python bench/startup_bench.py --dir /var/tmp/kvreuse-startup --sizes-gib 1 5 10
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time

import torch

from kvreuse.store import ChunkEntry, ChunkKey, ChunkStore, ModelFingerprint, StoreConfig
from kvreuse.store.persist import plan
from kvreuse.store.tiers.disk import SUFFIX, model_dir, scan_index

FP = ModelFingerprint("LlamaForCausalLM", "startup-bench", "bfloat16")


def entry_shape(entry_mib: float) -> tuple[int, int, int, int]:
    """[layers, tokens, kv_heads, head_dim] of a bf16 chunk whose K+V take about ``entry_mib`` MiB."""
    layers, heads, dim = 32, 8, 128
    tokens = max(1, round(entry_mib * 2**20 / (2 * layers * heads * dim * 2)))
    return layers, tokens, heads, dim


def fill(root: str, target_bytes: int, shape: tuple[int, int, int, int], start: int) -> tuple[int, int]:
    """Write entries numbered from ``start`` until the directory holds ``target_bytes``; returns (next index, bytes)."""
    d = model_dir(root, FP.digest)
    os.makedirs(d, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    k = torch.randn(shape, generator=g).bfloat16()
    v = torch.randn(shape, generator=g).bfloat16()
    held = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(SUFFIX))
    i = start
    while held < target_bytes:
        ids = torch.arange(shape[1]) + i * shape[1]
        e = ChunkEntry(ChunkKey.of(FP, ids), ids, torch.arange(shape[1]), k, v,
                       preceding={b"isolated": tuple(ChunkKey.of(FP, [i, j]).digest for j in range(i % 8))})
        head, bufs = plan(e, FP.digest)
        with open(os.path.join(d, e.key.hex() + SUFFIX), "wb") as f:
            f.write(head)
            for b in bufs:
                f.write(memoryview(b))
        held += len(head) + sum(b.nbytes for b in bufs)
        i += 1
    os.sync()
    return i, held


def drop_pages(root: str) -> None:
    d = model_dir(root, FP.digest)
    for name in os.listdir(d):
        fd = os.open(os.path.join(d, name), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn, reps: int, cold_root: str | None) -> float:
    out = []
    for _ in range(reps):
        if cold_root is not None:
            drop_pages(cold_root)
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/var/tmp/kvreuse-startup-bench")
    ap.add_argument("--sizes-gib", type=float, nargs="+", default=[1, 5, 10])
    ap.add_argument("--entry-mib", type=float, default=1.0, help="KV bytes per entry (default 1 MiB: 8 tokens "
                    "of a 32-layer, 8-KV-head, 128-dim bf16 model)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if os.path.exists(args.dir):
        raise SystemExit(f"--dir {args.dir} exists; the bench fills (and deletes) a directory of its own")
    shape = entry_shape(args.entry_mib)
    budget = int(max(args.sizes_gib) * 2**30 * 1.1)
    cfg = StoreConfig(disk_path=args.dir, disk_bytes=budget)

    def open_store() -> int:
        with ChunkStore(cfg, FP) as store:
            return len(store.disk)

    def scan() -> int:
        return sum(1 for _ in scan_index(args.dir, FP.digest))

    print(f"entry: {shape} bf16 (K+V {2 * torch.Size(shape).numel() * 2 / 2**20:.2f} MiB); dir {args.dir}")
    print(f"{'size':>8} {'entries':>8} {'open cold s':>12} {'open warm s':>12} {'scan cold s':>12} "
          f"{'scan warm s':>12} {'us/entry':>9}")
    nxt = 0
    try:
        for gib in sorted(args.sizes_gib):
            t0 = time.perf_counter()
            nxt, held = fill(args.dir, int(gib * 2**30), shape, nxt)
            fill_s = time.perf_counter() - t0
            n = open_store()
            assert n == nxt, (n, nxt)
            assert scan() == n
            oc = timed(open_store, args.reps, args.dir)
            ow = timed(open_store, args.reps, None)
            sc = timed(scan, args.reps, args.dir)
            sw = timed(scan, args.reps, None)
            print(f"{held / 2**30:7.2f}G {n:8d} {oc:12.3f} {ow:12.3f} {sc:12.3f} {sw:12.3f} {1e6 * oc / n:9.1f}"
                  f"   (filled in {fill_s:.0f} s)", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
