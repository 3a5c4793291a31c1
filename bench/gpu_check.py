"""One-command GPU check: build `kvreuse._C`, run the GPU tests, benchmark the kernels against copy bandwidth.

    python bench/gpu_check.py            # or: make gpu-check

For a CUDA host with torch, Triton and nvcc (vLLM is not needed).  From the repository root it:

  1. builds `kvreuse._C` in place with setup.py (`TORCH_CUDA_ARCH_LIST` defaults to this GPU's
     architecture + PTX, to keep the build short; set it to build for others);
  2. runs `tests/kernels` on the GPU: compiled Triton and the CUDA kernel against the PyTorch
     reference over vLLM 0.32-strided caches of every KVCacheLayout, the store's wait for saved KV
     gathered on the forward's stream (`test_stream_order.py`), and `compute-sanitizer` (memcheck,
     racecheck, initcheck) over the CUDA kernel when it is on PATH;
  3. runs `bench/kernel_bench.py` (fused place and gather vs the device-to-device copy bandwidth
     measured in the same run; relocate + patch vs re-prefilling a 4k chunk) and writes
     `bench/results/kernel_<gpu>.json`, then prints the table and the issue's targets.

Each step has a time limit so the whole check stays under 8 minutes.  Without a CUDA device it
says so and exits 0: there is nothing to check on this host.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_FRACTION = 0.80   # fused K+V relocate + patch + scatter at 4k tokens, 28 x 4 x 128 bf16, vs copy
TARGET_SPEEDUP = 200.0   # relocate + patch vs re-prefilling the chunk


def gpu_slug(name: str) -> str:
    """`NVIDIA H100 80GB HBM3` -> `h100`: the file name part of the results."""
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w and w not in ("nvidia", "geforce", "tesla")]
    out = []
    for w in words:   # up to the first word with a digit: "rtx 4090" -> "rtx4090"
        out.append(w)
        if any(c.isdigit() for c in w):
            break
    return "".join(out) or "gpu"


def step(title: str, argv: list[str], timeout: float, env: dict[str, str]) -> tuple[int, str]:
    print(f"\n=== {title}: {' '.join(argv)}", flush=True)
    t = time.time()
    try:
        r = subprocess.run(argv, cwd=ROOT, env=env, timeout=timeout, text=True, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
        out, rc = r.stdout, r.returncode
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        out, rc = out + f"\n[timed out after {timeout:.0f} s]", 124
    print(out[-6000:], flush=True)
    print(f"=== {title}: rc={rc} in {time.time() - t:.0f} s", flush=True)
    return rc, out


def summarize(result: dict) -> list[str]:
    """The benchmark table (fused kernels) and the issue's two targets, as printable lines."""
    lines = [f"device {result.get('device')}, copy {result.get('copy_GBps', float('nan')):.0f} GB/s, "
             f"KV cache layout {result.get('kv_layout')}",
             f"{'model':14s} {'tokens':>6s} {'rank':>4s} {'op':6s} {'backend':22s} {'us':>9s} {'GB/s':>7s} {'of copy':>7s}"]
    for r in result.get("rows", []):
        if "seconds" not in r:
            lines.append(f"{r['model']:14s} {r['tokens']:6d} {r['rank']:4d} {'':6s} {r['backend']:22s} ERROR {r['error']}")
            continue
        lines.append(f"{r['model']:14s} {r['tokens']:6d} {r['rank']:4d} {r.get('op', 'place'):6s} {r['backend']:22s} "
                     f"{r['seconds'] * 1e6:9.1f} {r['GBps']:7.0f} {r.get('fraction_of_copy', 0):7.1%}")
    best = [r for r in result.get("rows", []) if r["model"] == "qwen2.5-vl-7b" and r["tokens"] == 4096
            and r.get("op") is None and "fraction_of_copy" in r and r["backend"] != "reference"]
    if best:
        for rank in sorted({r["rank"] for r in best}):
            top = max((r for r in best if r["rank"] == rank), key=lambda r: r["fraction_of_copy"])
            ok = top["fraction_of_copy"] >= TARGET_FRACTION
            lines.append(f"target: fused place, 4k tokens, 28x4x128 bf16, patch rank {rank}: "
                         f"{top['fraction_of_copy']:.1%} of copy ({top['backend']}) "
                         f"{'>=' if ok else '<'} {TARGET_FRACTION:.0%}: {'MET' if ok else 'NOT MET'}")
    for p in result.get("prefill_vs_relocate", []):
        if "speedup" in p:
            ok = p["speedup"] >= TARGET_SPEEDUP
            lines.append(f"target: {p['model']} relocate+patch vs re-prefill of 4k tokens: {p['speedup']:.0f}x "
                         f"{'>=' if ok else '<'} {TARGET_SPEEDUP:.0f}x: {'MET' if ok else 'NOT MET'}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-build", action="store_true", help="use the kvreuse._C already built")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--out", default=None, help="results JSON (default bench/results/kernel_<gpu>.json)")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this host (torch.cuda.is_available() is False); nothing to check. "
              "Run `python bench/gpu_check.py` on a CUDA host with torch, Triton and nvcc.")
        return 0
    t0 = time.time()
    name = torch.cuda.get_device_name()
    major, minor = torch.cuda.get_device_capability()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    env.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}+PTX")
    report: dict = {"device": name, "capability": f"{major}.{minor}", "steps": {}}
    failed = []

    if not args.skip_build:
        if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
            print("gpu_check: nvcc not found: the CUDA kernel cannot be built (Triton is still checked)")
            report["steps"]["build"] = "skipped: no nvcc"
        else:
            rc, out = step("build kvreuse._C", [sys.executable, "setup.py", "build_ext", "--inplace"], 300,
                           {**env, "KVREUSE_BUILD_CUDA": "1"})
            report["steps"]["build"] = rc
            if rc:
                failed.append("build")
    if not args.skip_tests:
        import importlib.util

        if importlib.util.find_spec("pytest") is None:
            print("gpu_check: pytest is not installed (pip install pytest); GPU tests not run")
            report["steps"]["tests"] = "skipped: no pytest"
            failed.append("tests")
        else:
            rc, out = step("GPU tests", [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "not slow", "tests/kernels"],
                           270, env)
            report["steps"]["tests"] = rc
            report["tests_tail"] = out.strip().splitlines()[-1:] if out.strip() else []
            if rc:
                failed.append("tests")
    out_path = Path(args.out) if args.out else ROOT / "bench" / "results" / f"kernel_{gpu_slug(name)}.json"
    left = max(90.0, 470 - (time.time() - t0))
    rc, _ = step("kernel benchmark", [sys.executable, "bench/kernel_bench.py", "--chunks", "1024", "4096", "16384",
                                      "--out", str(out_path)], left, env)
    report["steps"]["bench"] = rc
    if rc == 0 and out_path.exists():
        result = json.loads(out_path.read_text())
        result["gpu_check"] = report
        out_path.write_text(json.dumps(result, indent=1))
        print("\n" + "\n".join(summarize(result)))
    else:
        failed.append("bench")
    print(f"\ngpu_check: {'FAILED: ' + ', '.join(failed) if failed else 'all steps passed'} "
          f"({time.time() - t0:.0f} s); results in {out_path.relative_to(ROOT) if out_path.is_relative_to(ROOT) else out_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
