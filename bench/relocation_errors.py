"""Measured relocation error per RoPE variant vs vLLM's own rotary modules, and patch sizes.

    python bench/relocation_errors.py [--out bench/results/relocation_errors.json]

For each variant and dtype: relative error (Frobenius, against the float64 application of the
engine's fp32 table) of kvreuse's relocation p -> p' and of vLLM's own rope at p' and at p,
median over the (length, shift) cases; and the bytes of a rank-16 patch as a fraction of a
chunk's KV for a Qwen2.5-VL-7B-shaped stack (28 layers, 4 KV heads, head dim 128, bf16).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvreuse import RopeSpec, fit_patch, relocate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from tests.core.test_relocate_vs_vllm import CASES, VARIANTS, _apply64, _rel
    from tests.core.vllm_support import vllm_apply, vllm_rope

    torch.manual_seed(0)
    rows = []
    variants = [(v[0], v[1], v[2], v[3], v[5]) for v in VARIANTS]
    variants += [("mrope-[16,24,24]", 128, True, {"rope_theta": 1e6, "mrope_section": [16, 24, 24]}, 32768),
                 ("mrope-interleaved", 128, True, {"rope_theta": 1e6, "mrope_section": [24, 20, 20],
                                                   "mrope_interleaved": True}, 32768),
                 ("mla-k_pe-deepseek_yarn", 64, False, {"rope_type": "deepseek_yarn", "factor": 40.0,
                  "original_max_position_embeddings": 4096, "mscale": 1.0, "mscale_all_dim": 1.0,
                  "rope_theta": 10000.0}, 163840)]
    for name, head, neox, params, max_pos in variants:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            r_dt = vllm_rope(head, max_pos, neox, params, dtype)
            r32 = vllm_rope(head, max_pos, neox, params, torch.float32)
            spec = RopeSpec.from_vllm(r_dt)
            ours, at_dst, at_src, ratios = [], [], [], []
            for n, p, q in CASES:
                q = min(q, r_dt.cos_sin_cache.shape[0] - n - 1)
                k = torch.randn(n, 2, head).to(dtype)
                src, dst = torch.arange(p, p + n), torch.arange(q, q + n)
                if spec.mrope_section is not None:
                    src, dst = src.view(1, -1).expand(3, -1), dst.view(1, -1).expand(3, -1)
                stored = vllm_apply(r_dt, src, k)
                truth = _apply64(r32, dst, k)
                e = _rel(relocate(stored, src, dst, spec), truth)
                ev, ein = _rel(vllm_apply(r_dt, dst, k), truth), _rel(stored, _apply64(r32, src, k))
                ours.append(e), at_dst.append(ev), at_src.append(ein), ratios.append(e / max(ev, ein, 1e-30))
            rows.append({"variant": name, "dtype": str(dtype).split(".")[-1],
                         "kvreuse_rel_err": statistics.median(ours), "vllm_rel_err_at_dst": statistics.median(at_dst),
                         "vllm_rel_err_at_src": statistics.median(at_src), "max_ratio_to_vllm": max(ratios)})
            r = rows[-1]
            print(f"{name:26s} {r['dtype']:9s} kvreuse {r['kvreuse_rel_err']:.3e}  vLLM@p' {r['vllm_rel_err_at_dst']:.3e}"
                  f"  vLLM@p {r['vllm_rel_err_at_src']:.3e}  max ratio {r['max_ratio_to_vllm']:.2f}", flush=True)

    # Rank-16 patch bytes vs chunk KV bytes, Qwen2.5-VL-7B-shaped (28 layers, 4 KV heads, d 128, bf16)
    patch_rows = []
    for n in (256, 1024, 4096):
        dk = torch.randn(28, n, 4, 128)
        patch = fit_patch(dk, torch.randn_like(dk), energy=1.0, max_rank=16, budget=None, dtype=torch.bfloat16)
        kv_bytes = 2 * 28 * n * 4 * 128 * 2
        patch_rows.append({"num_tokens": n, "patch_bytes": patch.nbytes, "kv_bytes": kv_bytes,
                           "fraction": patch.nbytes / kv_bytes})
        print(f"rank-16 patch, {n} tokens: {patch.nbytes} B = {patch.nbytes / kv_bytes:.2%} of {kv_bytes} B KV")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "relocation": rows,
                                              "patch_rank16_qwen25vl7b": patch_rows}, indent=1))


if __name__ == "__main__":
    main()
