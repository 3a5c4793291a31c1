"""The repair frontier offline: kvreuse's planner replayed on the real model in transformers, no server.

For each request of a fidelity workload (`bench/fidelity/workloads.py`, the same seeded requests as
bench/fidelity_bench.py), kvreuse's scheduler side (`SchedulerSide`: the server's planner, driven step by
step as the segmented scheduler drives it) plans the prompt, and the replay builds the request's KV as
the server's workers would: each placed item is the KV the model computed for that chunk in the request
that saved it, re-rotated (RoPE) from the positions it was saved at to its new ones; each computed
segment is prefilled in place, attending to everything before it; then the answer is decoded greedily
(12 tokens).  Compared with a full prefill of the same prompt, per workload and arm:
  same answers  greedy answers identical to full prefill's
  accuracy      answers holding the gold fact (full prefill's beside it)
  placed        share of prompt tokens placed
  steps         scheduler steps to prefill a prompt (each computed segment is one)
  TTFT est.     (steps * --step-ms + computed tokens * --token-ms) / (--step-ms + all tokens * --token-ms):
                the prefill's cost model, with bench/step_bench.py's decode step and per-token prefill
                times on the host; no server overhead, no load time (a server run measures those)

In float32, where full prefill is deterministic, so no noise floor is needed; about a minute an arm and
workload on 2 cores, so a repair can be weighed before it is built into the server (fidelity_bench.py
then measures it served, in bfloat16, with real TTFT).  An arm is `NAME=JSON`: a kvreuse config, plus an
optional bench-only `"force"` that overrides the plan, for bounds no planner can reach:
  tail:N      compute the last N prompt tokens
  starts:N    compute the first N tokens after every blank line (each passage's start)
They bound answers, not speed: a forced arm's steps and TTFT estimate are its plan's, without the steps the
override's own computed spans would add.  A bench-only `"one_step": true` bounds speed instead: the plan is
made with no cost for an extra step (so every placement that saves prefill is made) and the estimate counts
one step a request, as if every computed span of a prompt ran in one forward pass (vLLM's runner computes
one contiguous span of a request a step; kvreuse's repair would need several).

    python bench/repair_frontier.py                       # the default arms on rag, agent_raw, agent_chat
    python bench/repair_frontier.py --workloads rag --requests 20 \\
        --arm 'acc8={"policy": {"fidelity": "accurate", "repair_tokens": 8}}' \\
        --arm 'fast-tail={"policy": {"fidelity": "fast"}, "force": "tail:64"}'
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Any, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.fidelity.workloads import WORKLOADS, Request, render  # noqa: E402
from bench.serve_common import command_line, host_name, host_tag, write_json  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
OUTPUT_TOKENS = 12
DEFAULT_ARMS = (
    'exact={}',
    'fast={"policy": {"fidelity": "fast"}}',
    'accurate={"policy": {"fidelity": "accurate"}}',
    'accurate-r8={"policy": {"fidelity": "accurate", "repair_tokens": 8}}',
    'accurate-r32={"policy": {"fidelity": "accurate", "repair_tokens": 32}}',
    'accurate-every={"policy": {"fidelity": "accurate", "repair_scope": "every"}}',
    'accurate+starts16={"policy": {"fidelity": "accurate"}, "force": "starts:16"}',
    'fast+tail128={"policy": {"fidelity": "fast"}, "force": "tail:128"}',
)


def rerotate(rotary, k: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Keys `k` `[1, heads, T, head_dim]` rotated at positions p, rotated to p + `delta` `[T]` (RoPE composes)."""
    from transformers.models.llama.modeling_llama import rotate_half

    cos, sin = rotary(k, delta[None].to(torch.long))
    return k * cos[:, None] + rotate_half(k) * sin[:, None]


class Replay:
    """The model, and the KV of every chunk the replayed requests saved, as the store would hold it."""

    def __init__(self, model, tokenizer) -> None:
        self.model, self.tok = model, tokenizer
        self.layers = model.config.num_hidden_layers
        self.saved: dict[Any, tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]] = {}

    @torch.no_grad()
    def forward(self, ids: Sequence[int], start: int, cache) -> torch.Tensor:
        pos = torch.arange(start, start + len(ids))[None]
        out = self.model(input_ids=torch.tensor([list(ids)]), position_ids=pos, past_key_values=cache, use_cache=True)
        return out.logits[0, -1]

    def decode(self, logits: torch.Tensor, cache, pos: int) -> list[int]:
        out: list[int] = []
        for _ in range(OUTPUT_TOKENS):
            t = int(logits.argmax())
            out.append(t)
            if t == self.tok.eos_token_id:
                break
            logits = self.forward([t], pos, cache)
            pos += 1
        return out

    def full(self, ids: Sequence[int]) -> list[int]:
        from transformers import DynamicCache

        cache = DynamicCache()
        return self.decode(self.forward(ids, 0, cache), cache, len(ids))

    def placed(self, ids: Sequence[int], loads: list, saves: list) -> list[int]:
        """Answer `ids` with `loads` placed and the rest computed in order; keep the KV of `saves` after it."""
        from transformers import DynamicCache

        cache, pos = DynamicCache(), 0
        rotary = self.model.model.rotary_emb
        for it in sorted(loads, key=lambda it: it.dst_start):
            if it.dst_start > pos:
                self.forward(ids[pos:it.dst_start], pos, cache)
            origin, kv = self.saved.get((it.key, it.context)) or self.saved[it.key]
            a, b = it.src_start, it.src_end
            delta = torch.arange(it.dst_start, it.dst_end) - torch.arange(origin + a, origin + b)
            for layer in range(self.layers):
                k, v = kv[layer]
                cache.update(rerotate(rotary, k[:, :, a:b], delta), v[:, :, a:b].clone(), layer)
            pos = it.dst_end
        logits = self.forward(ids[pos:], pos, cache)
        for sv in saves:
            kv = [(cache.layers[i].keys[:, :, sv.start:sv.end].clone(), cache.layers[i].values[:, :, sv.start:sv.end].clone())
                  for i in range(self.layers)]
            self.saved[(sv.key, sv.context)] = self.saved[sv.key] = (sv.start, kv)
        return self.decode(logits, cache, len(ids))


# ------------------------------------------------------------------ bounds (bench-only plan overrides)
def _token_span(offsets: list[tuple[int, int]], a: int, b: int, n: int) -> tuple[int, int]:
    """Tokens covering characters [a, b)."""
    ta = next((i for i, (_, y) in enumerate(offsets) if y > a), n)
    tb = next((i for i, (x, _) in enumerate(offsets) if x >= b), n)
    return ta, tb


def _cut(loads: list, a: int, b: int) -> list:
    """`loads` with prompt positions [a, b) left to compute."""
    out = []
    for it in loads:
        if it.dst_end <= a or it.dst_start >= b:
            out.append(it)
            continue
        if it.dst_start < a:
            out.append(dataclasses.replace(it, src_end=it.src_start + a - it.dst_start))
        if it.dst_end > b:
            out.append(dataclasses.replace(it, src_start=it.src_start + b - it.dst_start, dst_start=b))
    return out


def forced(force: str | None, loads: list, text: str, offsets: list[tuple[int, int]], n: int) -> list:
    if not force:
        return loads
    kind, _, arg = force.partition(":")
    if kind == "tail":
        return _cut(loads, n - int(arg), n)
    if kind == "starts":
        at = 0
        while (at := text.find("\n\n", at)) >= 0:
            at += 2
            a = _token_span(offsets, at, at, n)[0]
            loads = _cut(loads, a, a + int(arg))
        return loads
    raise SystemExit(f"repair_frontier: unknown force {force!r} (tail:N, starts:N)")


# ------------------------------------------------------------------ one arm on one workload
def run_arm(model, tok, requests: list[Request], config: dict, refs: dict[int, list[int]],
            step_s: float, token_s: float) -> list[dict]:
    from kvreuse.connector.config import ConnectorConfig
    from kvreuse.connector.scheduler import SchedulerSide
    from tests.support.sched_requests import SchedRequest, run_to_end

    config = dict(config)
    force = config.pop("force", None)
    one_step = bool(config.pop("one_step", False))
    # the cost model at the host's measured rates, fixed (a server learns them from its own steps)
    cfg = ConnectorConfig.from_extra_config({**config, "cost": {"learn": False,
                                                                "step_overhead_s": 0.0 if one_step else step_s,
                                                                "prefill_s_per_token": token_s,
                                                                **config.get("cost", {})}})
    boundary = frozenset(tok.convert_tokens_to_ids(list(cfg.chunking.boundary_tokens)))
    side = SchedulerSide(cfg, b"repair-frontier!", boundary, block_size=128)
    side.segmented = True
    replay = Replay(model, tok)
    rows = []
    for i, req in enumerate(requests):
        text = render(req, tok)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, n = enc["input_ids"], len(enc["input_ids"])
        if i not in refs:
            refs[i] = replay.full(ids)
        r, metas = SchedRequest(f"r{i}", ids, hash_block=128), []
        run_to_end(side, r, metas=metas)  # one step per computed segment
        side.finished(r)
        steps = len(metas)
        paid = 1 if one_step else steps
        loads = [it for m in metas for ld in m.loads for it in ld.items]
        saves = [it for m in metas for sv in m.saves for it in sv.items]
        loads = forced(force, loads, text, enc["offset_mapping"], n)
        got = replay.placed(ids, loads, saves)
        placed = sum(it.src_end - it.src_start for it in loads)
        rows.append({"same": got == refs[i], "ok": req.correct(tok.decode(got)), "ok_ref": req.correct(tok.decode(refs[i])),
                     "placed": placed, "tokens": n, "steps": steps,
                     "ttft_est": (paid * step_s + (n - placed) * token_s) / (step_s + n * token_s)})
    return rows


def summary(rows: list[dict]) -> dict:
    k = len(rows)
    return {"n": k, "same_answer": sum(r["same"] for r in rows) / k, "accuracy": sum(r["ok"] for r in rows) / k,
            "accuracy_ref": sum(r["ok_ref"] for r in rows) / k,
            "placed_share": sum(r["placed"] for r in rows) / sum(r["tokens"] for r in rows),
            "steps_mean": statistics.mean(r["steps"] for r in rows),
            "ttft_est_mean": statistics.mean(r["ttft_est"] for r in rows)}


def parse_arm(spec: str) -> tuple[str, dict]:
    name, sep, text = spec.partition("=")
    cfg = json.loads(text) if sep else None
    if not name or not isinstance(cfg, dict):
        raise SystemExit(f"repair_frontier: --arm expects NAME=JSON (a JSON object), got {spec!r}")
    return name, cfg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="rag,agent_raw,agent_chat", help=f"comma-separated, of {list(WORKLOADS)}")
    ap.add_argument("--requests", type=int, default=40, help="requests per workload")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arm", action="append", default=[], metavar="NAME=JSON", help="an arm (default: DEFAULT_ARMS)")
    ap.add_argument("--step-ms", type=float, default=22.0, help="one decode step (bench/step_bench.py)")
    ap.add_argument("--token-ms", type=float, default=0.6, help="prefill per token (bench/step_bench.py)")
    ap.add_argument("--model", default=None, help="checkpoint directory (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--out", default=None, help="JSON results (default bench/results/repair_frontier_<host>.json)")
    a = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvreuse.models.smollm2 import build_smollm2

    torch.manual_seed(0)
    model_dir = a.model or str(build_smollm2())
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    arms = [parse_arm(s) for s in (a.arm or DEFAULT_ARMS)]
    out_rows, t0 = [], time.time()
    for wl in a.workloads.split(","):
        requests = WORKLOADS[wl](a.requests, a.seed)
        refs: dict[int, list[int]] = {}
        for name, cfg in arms:
            t = time.time()
            row = {"workload": wl, "arm": name, "config": cfg,
                   **summary(run_arm(model, tok, requests, cfg, refs, a.step_ms / 1e3, a.token_ms / 1e3))}
            out_rows.append(row)
            print(f"{wl:11s} {name:20s} same {row['same_answer']:4.0%}  accuracy {row['accuracy']:4.0%} "
                  f"({row['accuracy_ref']:.0%})  placed {row['placed_share']:4.0%}  steps {row['steps_mean']:.2f}  "
                  f"TTFT est. {row['ttft_est_mean']:.2f}  [{time.time() - t:.0f} s]", flush=True)
    tag = host_tag()
    out = a.out or os.path.join(RESULTS, f"repair_frontier_{tag}.json" if tag else "repair_frontier.json")
    command = command_line(None if argv is None else ["bench/repair_frontier.py", *argv])
    write_json(out, {"bench": "repair_frontier", "command": command, "model": os.path.basename(model_dir.rstrip("/")), "dtype": "float32",
                     "host": host_name(), "requests": a.requests, "seed": a.seed,
                     "step_ms": a.step_ms, "token_ms": a.token_ms, "elapsed_s": time.time() - t0, "rows": out_rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
