"""Chunk store benchmark: put/get throughput per tier, and cost-aware vs LRU hit rates.

    .venv/bin/python bench/store_bench.py                      # default run (~2-3 min on 2 CPU cores)
    .venv/bin/python bench/store_bench.py --sizes 256,1024,4096,16384 --reps 5 --trace-len 200000

Part 1: a Qwen2.5-VL-7B-shaped chunk (28 layers, 4 KV heads, head dim 128, bf16: 56 KiB per
token) of 256..16k tokens is put into and read back from each tier; medians of ``--reps`` timed
runs after a warm-up, as GB/s and entries/s, next to the machine's memcpy and raw disk bandwidth
measured in the same run.  Disk reads start cold (the files' pages are dropped with
``posix_fadvise``), as do the raw disk reads they are compared with.

Part 2: a Zipf-skewed reuse trace over a catalog of text and image chunks of varied sizes; each
policy runs the store's own policy classes over a byte budget of 5%, 15% and 40% of the catalog.
Reported: request hit rate and the share of recompute seconds saved (what the store is for).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

LAYERS, HEADS, HEAD_DIM = 28, 4, 128
BYTES_PER_TOKEN = LAYERS * HEADS * HEAD_DIM * 2 * 2  # K and V, bf16


def median_time(fn, reps: int, setup=None) -> float:
    ts = []
    for _ in range(reps):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def baselines(tmp: str, nbytes: int, reps: int) -> dict[str, float]:
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8).random_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    memcpy = nbytes / median_time(lambda: dst.copy_(src), reps)
    path = os.path.join(tmp, "raw.bin")
    buf = src.numpy()

    def write():
        with open(path, "wb") as f:
            f.write(memoryview(buf))
            f.flush()
            os.fsync(f.fileno())

    write()
    wr = nbytes / median_time(write, reps)

    def read():
        with open(path, "rb") as f:
            f.readinto(memoryview(dst.numpy()))

    rd = nbytes / median_time(read, reps, setup=lambda: drop_cache(path))
    os.unlink(path)
    return {"memcpy": memcpy, "disk_write": wr, "disk_read_cold": rd}


def make_entry(tokens: int, seed: int):
    import torch

    from kvreuse.store import ChunkEntry, ChunkKey, ModelFingerprint

    fp = ModelFingerprint("Qwen2_5_VLForConditionalGeneration", "bench", "bfloat16")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 150_000, (tokens,), generator=g)
    k = torch.randn(LAYERS, tokens, HEADS, HEAD_DIM, generator=g).to(torch.bfloat16)
    v = torch.randn(LAYERS, tokens, HEADS, HEAD_DIM, generator=g).to(torch.bfloat16)
    return fp, ChunkEntry(ChunkKey.of(fp, ids), ids, torch.arange(tokens), k, v)


def bench_tier(tier: str, tokens: int, reps: int, tmp: str, redis_url: str | None) -> tuple[float, float] | None:
    """Median seconds of (put, get) of one entry in ``tier`` alone."""
    import torch

    from kvreuse.store import ChunkStore, StoreConfig
    from kvreuse.store.tiers.redis import MAX_VALUE_BYTES

    fp, e = make_entry(tokens, seed=tokens)
    n = e.nbytes
    if tier == "redis" and n + 65536 > MAX_VALUE_BYTES:
        return None
    budget = 3 * n + (1 << 20)
    cfg = StoreConfig.from_dict({"device": {"device_bytes": budget}, "host": {"host_bytes": budget},
                                 "disk": {"disk_path": os.path.join(tmp, f"d{tokens}"), "disk_bytes": budget},
                                 "redis": {"redis_url": redis_url, "redis_bytes": budget}}[tier])
    with ChunkStore(cfg, fp) as store:
        def put():
            store.put(e)
            store.flush()

        def get():
            h = store.fetch(e.key, e.token_ids)
            assert h is not None
            out = h.result(timeout=600)
            assert out.k.shape == e.k.shape

        def clear():
            store.remove(e.key)
            store.flush()

        def cold():
            if tier == "disk":
                drop_cache(store.disk.path(e.key))

        put_s = median_time(put, reps, setup=clear)
        if tier == "disk":
            # a disk get loads into CPU tensors (no memory tier to promote into), leaving the file in place
            got = median_time(get, reps, setup=cold)
        else:
            got = median_time(get, reps)
        torch.testing.assert_close(store.get(e.key, e.token_ids, timeout=600).k, e.k, rtol=0, atol=0)
    return put_s, got


def part1(args, tmp: str, redis_url: str | None) -> None:
    import torch

    base = baselines(tmp, 256 << 20, args.reps)
    print(f"baselines (256 MiB, median of {args.reps}): memcpy {base['memcpy'] / 1e9:.2f} GB/s, "
          f"disk write+fsync {base['disk_write'] / 1e9:.2f} GB/s, disk read (cold) {base['disk_read_cold'] / 1e9:.2f} GB/s")
    print("device tier on this machine:", "cuda" if torch.cuda.is_available() else
          "CPU tensors (no GPU): put/get adopt tensors without copying, so GB/s there is bookkeeping speed")
    tiers = ["device", "host", "disk"] + (["redis"] if redis_url else [])
    for t in tiers:  # warm-up: first-use costs (allocator, page faults, script load) out of the timings
        bench_tier(t, 256, 1, tmp, redis_url)
    print(f"\n{'tier':7} {'tokens':>6} {'MiB':>7} | {'put GB/s':>9} {'put ent/s':>9} {'x ref':>6} | "
          f"{'get GB/s':>9} {'get ent/s':>9} {'x ref':>6}   (ref: memcpy; disk: raw disk write / cold read)")
    for tokens in args.sizes:
        for t in tiers:
            r = bench_tier(t, tokens, args.reps, tmp, redis_url)
            n = tokens * BYTES_PER_TOKEN
            if r is None:
                print(f"{t:7} {tokens:>6} {n / 2**20:>7.0f} | skipped: above Redis' 512 MiB value limit")
                continue
            ref_put = base["disk_write"] if t == "disk" else base["memcpy"]
            ref_get = base["disk_read_cold"] if t == "disk" else base["memcpy"]
            print(f"{t:7} {tokens:>6} {n / 2**20:>7.0f} | {n / r[0] / 1e9:>9.2f} {1 / r[0]:>9.1f} {n / r[0] / ref_put:>6.2f} | "
                  f"{n / r[1] / 1e9:>9.2f} {1 / r[1]:>9.1f} {n / r[1] / ref_get:>6.2f}")


def part2(args) -> None:
    import numpy as np

    from kvreuse.store.entry import SECONDS_PER_TOKEN_LAYER
    from kvreuse.store.policy import make_policy

    rng = np.random.default_rng(args.seed)
    n = args.catalog
    image = rng.random(n) < 0.3
    # text chunks: 64..2048 tokens (log-uniform); images: 256..1280 placeholder tokens plus encoder cost
    tokens = np.where(image, rng.integers(256, 1281, n), np.exp(rng.uniform(np.log(64), np.log(2048), n)).astype(int))
    nbytes = tokens * BYTES_PER_TOKEN
    cost = tokens * LAYERS * SECONDS_PER_TOKEN_LAYER * np.where(image, 4.0, 1.0)  # vision encoder on top
    ranks = rng.permutation(n)  # popularity independent of size
    p = 1.0 / (ranks + 1) ** args.zipf
    p /= p.sum()
    trace = rng.choice(n, size=args.trace_len, p=p)
    total = int(nbytes.sum())
    print(f"\ntrace: {args.trace_len} requests over {n} chunks (30% images), Zipf s={args.zipf}, "
          f"catalog {total / 2**30:.1f} GiB; warm-up = first 10% of the trace, not scored")
    print(f"{'budget':>14} | {'policy':6} {'hit rate':>9} {'recompute saved':>16} {'byte hit':>9}")
    for frac in (0.05, 0.15, 0.40):
        budget = int(frac * total)
        for name in ("cost", "lru"):
            pol, held, used = make_policy(name), {}, 0
            hits = req = saved = all_cost = hit_bytes = all_bytes = 0
            warm = len(trace) // 10
            for t, i in enumerate(trace):
                i = int(i)
                scored = t >= warm
                if i in held:
                    held[i] += 1
                    pol.update(i, nbytes=int(nbytes[i]), cost=float(cost[i]), hits=held[i])
                    if scored:
                        hits, saved, hit_bytes = hits + 1, saved + cost[i], hit_bytes + nbytes[i]
                else:
                    if nbytes[i] <= budget:
                        while used + nbytes[i] > budget:
                            v = pol.peek()
                            pol.evicted(v)
                            used -= int(nbytes[v])
                            del held[v]
                        held[i] = 0
                        used += int(nbytes[i])
                        pol.update(i, nbytes=int(nbytes[i]), cost=float(cost[i]), hits=0)
                if scored:
                    req, all_cost, all_bytes = req + 1, all_cost + cost[i], all_bytes + nbytes[i]
                assert used <= budget
            print(f"{frac:>5.0%} {budget / 2**30:>5.1f} GiB | {name:6} {hits / req:>9.3f} {saved / all_cost:>16.3f} "
                  f"{hit_bytes / all_bytes:>9.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="256,1024,4096,16384", help="chunk sizes in tokens")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions per measurement (median reported)")
    ap.add_argument("--catalog", type=int, default=5000, help="distinct chunks in the reuse trace")
    ap.add_argument("--trace-len", type=int, default=60_000)
    ap.add_argument("--zipf", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-redis", action="store_true", help="skip the Redis tier")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]

    import torch

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if not args.skip_throughput:
        srv = None
        if not args.no_redis:
            from tests.support.redis_server import RedisServer

            try:
                srv = RedisServer().start()
            except (FileNotFoundError, RuntimeError, TimeoutError) as e:
                print(f"(no Redis tier: {e})")
        try:
            with tempfile.TemporaryDirectory(prefix="kvreuse-bench-", dir=os.environ.get("BENCH_DIR")) as tmp:
                part1(args, tmp, srv.url if srv else None)
        finally:
            if srv is not None:
                srv.close()
    part2(args)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
