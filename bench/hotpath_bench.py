"""Worker hot path: load time per step while the store fits patches, vs an idle store (same run).

    .venv/bin/python bench/hotpath_bench.py                 # ~1 min on 2 CPU cores
    .venv/bin/python bench/hotpath_bench.py --steps 100 --layers 16
    .venv/bin/python bench/hotpath_bench.py --rag --repeats 5   # the RAG bench's loads (bench/rag_bench.py)

`--rag` takes the shapes of `bench/rag_bench.py`'s loads on its 8-layer bf16 model (2 KV heads of 64):
content-defined chunks of 16-48 tokens (the connector's default cuts, ~32 on average), ~22 of them
(~700 tokens) placed per step, out of 66 stored (12 passages).  `--threads` defaults to every core
this process may run on, as vLLM's CPU worker binds its OpenMP threads (`VLLM_CPU_OMP_THREADS_BIND=auto`).

On a machine whose cores are shared with other busy processes, set `OMP_NUM_THREADS=1`: PyTorch's
OpenMP teams spin at every barrier and a descheduled team member stalls each op, which swamps
what is measured here.

No vLLM server: a `WorkerSide` over synthetic CPU_ATTN caches (the shapes vLLM's CPU backend
hands it).  Each step places `--loads` stored chunks at new positions (`start_load` + every
layer's `load_layer`, what a forward pass waits for) and, in the busy arm, also saves
`--saves` chunks computed in new contexts, so the store's thread relocates them and fits their
patches (SVDs) while later steps load.  Reported: load time per step (p50, p99) for both arms,
their ratio, the split of a load into fetch (`start_load`: store lookups) and place (every
`load_layer`: relocate + scatter), the time of the save call itself (copy out + `ingest`), and how
many patch fits ran during the busy arm.  Seeded; a whole idle arm runs first as a warm-up
(allocator, tables) and one warm-up step opens each arm.  With `--repeats R` both arms run R times
and each figure is the median over the repeats of its per-repeat value.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from kvreuse.connector.claim import LoadItem, SaveItem, context_signature  # noqa: E402
from kvreuse.connector.config import ConnectorConfig  # noqa: E402
from kvreuse.connector.metadata import KVReuseMetadata, ReqLoad, ReqSave  # noqa: E402
from kvreuse.connector.worker import WorkerSide  # noqa: E402
from kvreuse.paged import block_slots, scatter_kv  # noqa: E402
from kvreuse.rope.spec import RopeSpec  # noqa: E402
from kvreuse.store import ModelFingerprint, StoreConfig  # noqa: E402

BS = 128  # vLLM's CPU block size


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=256, help="tokens per chunk")
    ap.add_argument("--chunk-min", type=int, default=None, help="chunk lengths drawn in [min, max] (default: --chunk)")
    ap.add_argument("--chunk-max", type=int, default=None)
    ap.add_argument("--chunks", type=int, default=12, help="stored chunks")
    ap.add_argument("--loads", type=int, default=4, help="chunks placed per step")
    ap.add_argument("--saves", type=int, default=2, help="chunks saved in a new context per step (busy arm)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=1, help="run both arms this many times; report medians")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    ap.add_argument("--rag", action="store_true", help="bench/rag_bench.py's shapes (see above)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"), help="KV dtype")
    a = ap.parse_args()
    if a.rag:
        a.heads, a.chunk_min, a.chunk_max, a.chunks, a.loads = 2, 16, 48, 66, 22
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    L, H, D = a.layers, a.heads, a.head_dim
    rng = random.Random(0)
    lo, hi = a.chunk_min or a.chunk, a.chunk_max or a.chunk
    sizes = [rng.randint(lo, hi) for _ in range(a.chunks)]
    N = hi
    rope = RopeSpec.from_hf_config({"hidden_size": H * D, "num_attention_heads": H, "head_dim": D,
                                    "rope_theta": 10000.0, "max_position_embeddings": 1 << 16, "model_type": "llama"})
    dtype = getattr(torch, a.dtype)
    w = WorkerSide(ConnectorConfig(store=StoreConfig(device_bytes=4 << 30)), rope, ModelFingerprint("Bench", "w", a.dtype))
    per_req = -(-(a.loads * N) // BS) + 1
    nblocks = 2 * per_req + 2
    w.register({f"model.layers.{i}.self_attn.attn": torch.zeros(nblocks, H, BS, 2 * D, dtype=dtype)
                for i in range(L)}, "CPU_ATTN", H, D)
    chunks = [(bytes([j]) * 16, tuple(range(1000 * j, 1000 * j + sizes[j]))) for j in range(a.chunks)]
    src = list(range(per_req))  # blocks of the "computing" request
    dst = list(range(per_req, 2 * per_req))  # blocks of the "loading" request

    def compute(j: int, start: int, ctx: bytes) -> SaveItem:
        n = sizes[j]
        kv = torch.randn(2, L, n, H, D).to(dtype)
        slots = block_slots(src, BS, start, start + n)
        for i, name in enumerate(w.caches):
            scatter_kv(w.caches[name], w.spec, kv[0, i], kv[1, i], slots)
        key, toks = chunks[j]
        return SaveItem(key, toks, start, start + n, ctx, True)

    for j in range(a.chunks):  # the stored chunks, each in its own context
        w.save(KVReuseMetadata(saves=[ReqSave("seed", src, [compute(j, 0, context_signature((bytes([j]) * 16,)))])]))
    w.store.flush()

    def arm(busy: bool) -> dict[str, list[float]]:
        out = {"load": [], "fetch": [], "place": [], "save": []}
        for step in range(a.steps + 1):
            if busy:
                items = [compute((step * a.saves + s) % a.chunks, s * N, context_signature((b"s%d" % step,)))
                         for s in range(a.saves)]
                t0 = time.perf_counter()
                w.save(KVReuseMetadata(saves=[ReqSave(f"s{step}", src, items)]))
                out["save"].append(time.perf_counter() - t0)
            picks = [(step + i) % a.chunks for i in range(a.loads)]
            starts = [64 + sum(sizes[j] for j in picks[:i]) for i in range(len(picks))]
            items = [LoadItem(chunks[j][0], chunks[j][1], 0, sizes[j], s, context_signature((bytes([j]) * 16,)),
                              "exact") for s, j in zip(starts, picks)]
            t0 = time.perf_counter()
            w.start_load(KVReuseMetadata(loads=[ReqLoad(f"l{step}", dst, items, fidelity="fast")]))
            t1 = time.perf_counter()
            for name in w.caches:
                w.load_layer(name)
            t2 = time.perf_counter()
            if step:  # the first step of each arm is a warm-up
                out["load"].append(t2 - t0)
                out["fetch"].append(t1 - t0)
                out["place"].append(t2 - t1)
            assert not w.take_failed_blocks()
        return out

    arm(False)  # warm-up
    figs: dict[str, list[float]] = {}
    fits_during = fits_total = 0
    for _ in range(a.repeats):
        idle = arm(False)
        fits0 = w.store.snapshot_stats().captured_patches
        busy = arm(True)
        fits_during += w.store.snapshot_stats().captured_patches - fits0
        w.store.flush()
        fits_total += w.store.snapshot_stats().captured_patches - fits0
        for name, r in (("idle", idle), ("busy", busy)):
            for what, xs in r.items():
                if xs:
                    figs.setdefault(f"{name} {what} p50", []).append(statistics.median(xs))
                    figs.setdefault(f"{name} {what} p99", []).append(pct(xs, 0.99))
    w.close()
    f = {k: statistics.median(v) for k, v in figs.items()}
    ms = lambda x: f"{1e3 * x:7.2f} ms"  # noqa: E731
    tokens = sum(sizes[(a.steps + i) % a.chunks] for i in range(a.loads))
    print(f"{L} layers x {H} KV heads x {D} head dim, {a.dtype}; {a.loads} chunks of {lo}-{hi} tokens (~{tokens} tokens) "
          f"placed per step, {a.steps} steps per arm, {a.repeats} repeat(s), {torch.get_num_threads()} torch threads")
    for name in ("idle", "busy"):
        print(f"load per step, {name} store : p50 {ms(f[f'{name} load p50'])}  p99 {ms(f[f'{name} load p99'])}   "
              f"(fetch p50 {ms(f[f'{name} fetch p50'])}, place p50 {ms(f[f'{name} place p50'])})")
    print(f"ratio busy/idle p50: {f['busy load p50'] / f['idle load p50']:.2f}")
    print(f"save call (copy out + ingest of {a.saves} chunks): p50 {ms(f['busy save p50'])}  "
          f"p99 {ms(f['busy save p99'])}")
    print(f"patch fits finished while the busy arms ran: {fits_during} (of {fits_total} queued and not dropped)")


if __name__ == "__main__":
    main()
