"""Benchmark the fused relocate + patch + scatter operator against the memory roofline.

    python bench/kernel_bench.py --out bench/results/kernel_h100.json      # on a CUDA host
    python bench/kernel_bench.py --cpu-smoke --out /tmp/smoke.json        # tiny CPU run (reference)

For a Qwen2.5-VL-7B-shaped and a Llama-3-8B-shaped KV stack (bf16), chunk sizes 256..16k and
patch rank 0 / 16, it times eager PyTorch (the reference path), Triton (table and in-kernel cos/sin)
and CUDA (`kvreuse._C`, JIT-built from csrc/ when setup.py did not build it), all layers in one
call, into vLLM 0.32-strided caches (`--kv-layout`, default LBNHC, FlashAttention's default), and
the save-side gather; it reports bytes moved / median time against the device-to-device copy
bandwidth measured in the same run.  It also times re-prefilling a 4k chunk (the same model shape in plain PyTorch
with random weights) against relocating + patching it.  Needs no vLLM.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from kvreuse.layout import KV_CACHE_LAYOUTS, Reading, allocate  # noqa: E402
from kvreuse.ops import backends, gather, place  # noqa: E402
from kvreuse.patch import Factors, Patch  # noqa: E402
from kvreuse.rope import freqs  # noqa: E402
from kvreuse.rope.spec import RopeSpec  # noqa: E402

MODELS = {  # name: (layers, kv heads, head dim, hidden, q heads, intermediate, rope)
    "qwen2.5-vl-7b": (28, 4, 128, 3584, 28, 18944, dict(rotary_dim=128, mrope_section=(16, 24, 24))),
    "llama-3-8b": (32, 8, 128, 4096, 32, 14336, dict(rotary_dim=128)),
}
CHUNKS = [256, 1024, 4096, 16384]
RANKS = [0, 16]
BLOCK_SIZE = 16


def timeit(fn, device: str, reps: int = 20) -> float:
    """Median seconds of `fn()` (do_bench on CUDA when Triton is there, CUDA events otherwise)."""
    if device == "cuda":
        try:
            from triton.testing import do_bench

            return do_bench(fn, warmup=5, rep=100, return_mode="median") / 1e3
        except ImportError:
            pass
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        return statistics.median(times)
    fn()
    times = []
    for _ in range(max(3, reps // 4)):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def copy_bandwidth(device: str, nbytes: int) -> float:
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    return 2 * nbytes / timeit(lambda: dst.copy_(src), device)


def load_cuda_ext(log: dict) -> None:
    if backends.cuda_ext() is not None:
        log["cuda_ext"] = "kvreuse._C (built by setup.py)"
        return
    try:
        from torch.utils.cpp_extension import load

        t = time.time()
        mod = load("kvreuse_C_jit", [str(ROOT / "csrc" / "relocate.cu")], verbose=False,
                   extra_cuda_cflags=["-O3", "-std=c++17"])
        backends.use_cuda_ext(mod)
        log["cuda_ext"] = f"JIT-built from csrc/ in {time.time() - t:.0f} s"
    except Exception as e:  # report, keep benchmarking the other backends
        log["cuda_ext"] = f"unavailable: {type(e).__name__}: {e}"[:500]


def make_case(model: str, n: int, rank: int, device: str, dtype=torch.bfloat16, kv_layout: str = "LBNHC"):
    layers, h, d, *_, rope_kw = MODELS[model]
    rope = RopeSpec(inv_freq=freqs.default_inv_freq(1_000_000.0, d), **rope_kw)
    g = torch.Generator(device="cpu").manual_seed(n * 31 + rank)
    k = torch.randn(layers, n, h, d, generator=g).to(device, dtype)
    v = torch.randn(layers, n, h, d, generator=g).to(device, dtype)
    shape = (3, n) if rope.mrope_section else (n,)
    src = torch.arange(n).expand(shape).contiguous() + 100
    dst = src + 7000
    num_blocks = n // BLOCK_SIZE + 8
    blocks = torch.randperm(num_blocks, generator=g)[: -(-n // BLOCK_SIZE)]
    slots = (blocks[:, None] * BLOCK_SIZE + torch.arange(BLOCK_SIZE)).flatten()[:n].to(device)
    caches, layout = allocate(kv_layout, Reading.KV_SPLIT, num_layers=layers, num_blocks=num_blocks, num_heads=h,
                              block_size=BLOCK_SIZE, head_size=d, dtype=dtype, device=device)
    patch = None
    if rank:
        fac = lambda: Factors((torch.randn(n, h, rank, generator=g) * 0.1).to(device, dtype),
                              (torch.randn(h, rank, d, generator=g) * 0.1).to(device, dtype), (rank,) * h)
        patch = Patch([fac() for _ in range(layers)], [fac() for _ in range(layers)], n, h, d)
    moved = 2 * 2 * k.numel() * k.element_size()                       # read K, V; write K, V
    moved += patch.nbytes if patch else 0
    moved += n * rope.rotary_dim // 2 * 8 + n * 8                      # cos/sin table, slots
    return dict(k=k, v=v, src=src, dst=dst, rope=rope, caches=caches, layout=layout, slots=slots, patch=patch,
                bytes=moved, gather_bytes=2 * 2 * k.numel() * k.element_size() + n * 8)


def run_case(c, backend: str, angles: str = "table"):
    return lambda: place(c["caches"], c["layout"], c["k"], c["v"], c["src"], c["dst"], c["slots"], c["rope"],
                         c["patch"], backend=backend, angles=angles, validate=False)


def run_gather(c, backend: str):
    return lambda: gather(c["caches"], c["layout"], c["slots"], backend=backend)


class Layer(torch.nn.Module):
    """One decoder layer (RMSNorm, GQA attention with RoPE, SwiGLU MLP) in plain PyTorch."""

    def __init__(self, hidden, q_heads, kv_heads, head_dim, inter):
        super().__init__()
        self.qh, self.kvh, self.hd = q_heads, kv_heads, head_dim
        self.qkv = torch.nn.Linear(hidden, (q_heads + 2 * kv_heads) * head_dim, bias=True)
        self.o = torch.nn.Linear(q_heads * head_dim, hidden, bias=False)
        self.gate_up = torch.nn.Linear(hidden, 2 * inter, bias=False)
        self.down = torch.nn.Linear(inter, hidden, bias=False)
        self.n1 = torch.nn.RMSNorm(hidden)
        self.n2 = torch.nn.RMSNorm(hidden)

    def forward(self, x, cos, sin):                                  # x: [T, hidden]
        t = x.shape[0]
        q, k, v = self.qkv(self.n1(x)).split([self.qh * self.hd, self.kvh * self.hd, self.kvh * self.hd], -1)
        q, k, v = (y.view(t, -1, self.hd).transpose(0, 1) for y in (q, k, v))   # [heads, T, hd]

        def rope(y):
            y1, y2 = y.chunk(2, -1)
            return torch.cat((y1 * cos - y2 * sin, y2 * cos + y1 * sin), -1)
        a = torch.nn.functional.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True, enable_gqa=True)
        x = x + self.o(a.transpose(0, 1).reshape(t, -1))
        g, u = self.gate_up(self.n2(x)).chunk(2, -1)
        return x + self.down(torch.nn.functional.silu(g) * u)


def prefill_seconds(model: str, n: int, device: str, dtype=torch.bfloat16) -> float:
    layers, kvh, hd, hidden, qh, inter, _ = MODELS[model]
    with torch.device(device):
        layer = Layer(hidden, qh, kvh, hd, inter).to(dtype)          # one layer's weights, run L times
        x = torch.randn(n, hidden, dtype=dtype)
        ang = torch.arange(n, dtype=torch.float32)[:, None] * freqs.default_inv_freq(1e6, hd).to(device)[None]
        cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)

    @torch.inference_mode()
    def fwd():
        y = x
        for _ in range(layers):
            y = layer(y, cos, sin)
        return y
    return timeit(fwd, device, reps=5)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny CPU run of the reference path only")
    ap.add_argument("--chunks", type=int, nargs="*", default=None, help=f"chunk sizes (default {CHUNKS})")
    ap.add_argument("--models", nargs="*", default=None, choices=list(MODELS), help="model shapes (default all)")
    ap.add_argument("--kv-layout", default="LBNHC", choices=list(KV_CACHE_LAYOUTS), help="vLLM KVCacheLayout")
    ap.add_argument("--no-reference", action="store_true", help="skip the (slow) eager PyTorch rows on CUDA")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_smoke:
        print("kernel_bench: no CUDA device; the roofline numbers need a GPU "
              "(use --cpu-smoke for a tiny CPU run of the reference path)", file=sys.stderr)
        return 2
    device = "cuda" if cuda and not args.cpu_smoke else "cpu"
    chunks = args.chunks or ([64] if args.cpu_smoke else CHUNKS)
    result = {"command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
              "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "torch": torch.__version__, "kv_layout": args.kv_layout, "rows": []}
    names = [] if (device == "cuda" and args.no_reference) else ["reference"]
    if device == "cuda":
        if backends.triton_available():
            import triton

            result["triton"] = triton.__version__
            names += ["triton", "triton-kernel-angles"]
        load_cuda_ext(result)
        if backends.cuda_ext() is not None:
            names.append("cuda")
        result["copy_GBps"] = copy_bandwidth(device, 1 << 30) / 1e9
        print(f"device-to-device copy: {result['copy_GBps']:.0f} GB/s", flush=True)
    models = args.models or list(MODELS)
    for model in models:
        for n in chunks:
            for rank in RANKS:
                c = make_case(model, n, rank, device, kv_layout=args.kv_layout)
                for name in names:
                    backend, angles = ("triton", "kernel") if name == "triton-kernel-angles" else (name, "table")
                    try:
                        sec = timeit(run_case(c, backend, angles), device)
                    except Exception as e:  # one failing backend must not hide the others' numbers
                        result["rows"].append({"model": model, "tokens": n, "rank": rank, "backend": name,
                                               "error": f"{type(e).__name__}: {e}"[:300]})
                        print(f"{model:14s} n={n:6d} r={rank:2d} {name:22s} ERROR {e}", flush=True)
                        continue
                    row = {"model": model, "tokens": n, "rank": rank, "backend": name, "seconds": sec,
                           "bytes": c["bytes"], "GBps": c["bytes"] / sec / 1e9}
                    if "copy_GBps" in result:
                        row["fraction_of_copy"] = row["GBps"] / result["copy_GBps"]
                    result["rows"].append(row)
                    print(f"{model:14s} n={n:6d} r={rank:2d} {name:22s} {sec * 1e6:10.1f} us "
                          f"{row['GBps']:8.1f} GB/s {row.get('fraction_of_copy', 0):6.1%}", flush=True)
                for name in [x for x in names if x in ("reference", "triton", "cuda")] if rank == 0 else []:
                    sec = timeit(run_gather(c, name), device)
                    row = {"model": model, "tokens": n, "rank": 0, "backend": name, "op": "gather", "seconds": sec,
                           "bytes": c["gather_bytes"], "GBps": c["gather_bytes"] / sec / 1e9}
                    if "copy_GBps" in result:
                        row["fraction_of_copy"] = row["GBps"] / result["copy_GBps"]
                    result["rows"].append(row)
                    print(f"{model:14s} n={n:6d} gather {name:17s} {sec * 1e6:10.1f} us {row['GBps']:8.1f} GB/s "
                          f"{row.get('fraction_of_copy', 0):6.1%}", flush=True)
                del c
                if device == "cuda":
                    torch.cuda.empty_cache()
    if device == "cuda":
        n = 4096
        result["prefill_vs_relocate"] = []
        for model in models:
            pre = prefill_seconds(model, n, device)
            best = min((r for r in result["rows"] if r["model"] == model and r["tokens"] == n and r["rank"] == 16
                        and "seconds" in r and "op" not in r), key=lambda r: r["seconds"], default=None)
            entry = {"model": model, "tokens": n, "prefill_seconds": pre}
            if best:
                entry.update(relocate_patch_seconds=best["seconds"], backend=best["backend"],
                             speedup=pre / best["seconds"])
            result["prefill_vs_relocate"].append(entry)
            print(f"{model}: re-prefill 4k {pre * 1e3:.1f} ms; relocate+patch "
                  f"{entry.get('relocate_patch_seconds', float('nan')) * 1e6:.0f} us "
                  f"({entry.get('speedup', float('nan')):.0f}x)", flush=True)
            torch.cuda.empty_cache()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
