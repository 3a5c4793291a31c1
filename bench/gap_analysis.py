"""Offline: what ends reuse on a benchmark trace, turn by turn, without a server.

Replays a trace through kvreuse's own scheduler-side logic, as one `kvreuse serve` process with the
segmented scheduler would: vLLM's prefix hit (whole `--block-size` blocks of earlier prompts, before
the first approximate placement), `segment` / `chunk_keys`, `plan_segments` with the cost model,
and after each prompt the saves `plan_saves` plans, recorded in the `Directory` as the scheduler
records them.  Tokens are the tiny models' (one word, one token; `bench_model_spec`'s tokenizer).

Per turn it reports the tokens placed, the tokens any reuse could serve at most ("old": in an
8-gram of an earlier prompt), and the tokens of every computed gap by why the gap's chunk was not
placed:
  new        the chunk holds only text no earlier prompt had;
  straddle   the chunk mixes old and new text, or joins old texts that were never adjacent
             (the chunk that straddles a change point);
  resync     the chunk is old text, contiguous in an earlier prompt, but cut differently
             (content-defined cuts not yet back in step after a change point);
  cost       stored, but its placement was dropped by the cost model (`under_min`: shorter than
             `cost.min_tokens`; `no_pay`: the extra scheduler step costs more than it saves);
  policy     stored, refused by the policy mode;  last  the chunk holding the last prompt token.

    python bench/gap_analysis.py                      # raw agent, RAG, chat agent; 4 seeds each
    python bench/gap_analysis.py --trace raw --seeds 1 --turns-detail
    python bench/gap_analysis.py --chunking '{"avg_tokens": 64}' --cost '{"step_overhead_s": 0.01}'
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kvreuse.connector.claim import Directory, chunk_keys  # noqa: E402
from kvreuse.connector.config import ChunkingConfig, CostConfig  # noqa: E402
from kvreuse.connector.costs import CostModel  # noqa: E402
from kvreuse.connector.plan import plan_saves, plan_segments  # noqa: E402
from kvreuse.connector.segment import segment_prompt  # noqa: E402

MODEL = b"offline-analysis"
REASONS = ("new", "straddle", "resync", "under_min", "no_pay", "policy", "last")
NGRAM = 8


@dataclass
class Turn:
    tokens: int
    prefix_hit: int
    placed: int
    old: int                     # tokens inside an NGRAM of an earlier prompt: what reuse could serve at most
    gaps: Counter = field(default_factory=Counter)   # reason -> tokens
    placements: int = 0
    policies: Counter = field(default_factory=Counter)  # policy -> chunks placed
    computed_segments: int = 0   # runs of computed tokens: each is one more engine step for the request


class Replay:
    """One server's scheduler-side state across a trace's prompts."""

    def __init__(self, chunking: ChunkingConfig, cost: CostConfig, *, boundary_ids=frozenset(), end_ids=frozenset(),
                 block_size: int = 128, mode: str = "fast") -> None:
        self.chunking, self.cost_cfg, self.mode = chunking, cost, mode
        self.boundary_ids, self.end_ids, self.block_size = boundary_ids, end_ids, block_size
        self.directory = Directory()
        self.blocks: set[tuple[int, ...]] = set()   # vLLM prefix cache: token prefixes ending at a block boundary
        self.ngrams: set[tuple[int, ...]] = set()
        self.history: list[str] = []                # earlier prompts, as ",1,2,3," strings (substring tests)

    def prefix_hit(self, toks: list[int]) -> int:
        n = 0
        while n + self.block_size <= len(toks) - 1 and tuple(toks[:n + self.block_size]) in self.blocks:
            n += self.block_size
        return n

    def run(self, toks: list[int]) -> Turn:
        chunks, anchors = segment_prompt(toks, self.chunking, boundary_ids=self.boundary_ids, end_ids=self.end_ids)
        keys = chunk_keys(toks, chunks, MODEL, None)
        hit = self.prefix_hit(toks)
        cost = CostModel(**{**asdict(self.cost_cfg), "learn": False})
        plan = plan_segments(toks, chunks, keys, self.directory, hit, self.mode, cost=cost, anchors=anchors)
        free = plan_segments(toks, chunks, keys, self.directory, hit, self.mode, anchors=anchors)  # no cost model
        covered = [False] * len(toks)  # positions the plan places (whole chunks and edge-filled pieces)
        for it in plan.items:
            covered[it.dst_start:it.dst_end] = [True] * it.num_tokens
        free_runs = {it.dst_start: p.num_tokens for p in free.placements for it in p.items}
        old = [any(tuple(toks[s:s + NGRAM]) in self.ngrams for s in range(max(0, i - NGRAM + 1), i + 1))
               for i in range(len(toks))]
        turn = Turn(len(toks), hit, plan.placed_tokens, sum(old), placements=len(plan.placements),
                    policies=Counter(it.policy for it in plan.items),
                    computed_segments=sum(1 for i in range(hit, len(toks)) if not covered[i]
                                          and (i == hit or covered[i - 1])))
        for c, k in zip(chunks, keys):
            start = max(c.start, hit)
            n = sum(1 for i in range(start, c.end) if not covered[i])
            if c.end <= hit or n == 0:
                continue
            if start in free_runs:
                turn.gaps["under_min" if free_runs[start] < cost.min_tokens else "no_pay"] += n
            elif self.directory.get(k) is not None:
                turn.gaps["last" if c.end == len(toks) else "policy"] += n
            elif not any(old[c.start:c.end]):
                turn.gaps["new"] += n
            elif all(old[c.start:c.end]) and self._seen(toks[c.start:c.end]):
                turn.gaps["resync"] += n
            else:
                turn.gaps["straddle"] += n
        # the server: the blocks before the first approximate placement join vLLM's prefix cache; saves recorded
        first = plan.first_approximate
        upto = len(toks) if first is None else first
        for b in range(self.block_size, upto + 1, self.block_size):
            self.blocks.add(tuple(toks[:b]))
        for it in plan_saves(toks, chunks, keys, self.directory, plan.placed_keys, True):
            self.directory.record_save(it, anchors)
        self.ngrams.update(tuple(toks[s:s + NGRAM]) for s in range(len(toks) - NGRAM + 1))
        self.history.append("," + ",".join(map(str, toks)) + ",")
        return turn

    def _seen(self, toks: list[int]) -> bool:
        s = "," + ",".join(map(str, toks)) + ","
        return any(s in h for h in self.history)


# ---------------------------------------------------------------- traces (the benchmarks' own generators)
def tokenizer():
    from transformers import AutoTokenizer

    from bench.serve_common import bench_model_spec
    from kvreuse.models import build_tiny_model

    return AutoTokenizer.from_pretrained(str(build_tiny_model(None, bench_model_spec())))


def trace_prompts(name: str, seed: int, tok) -> list[str]:
    from bench.rag_bench import rag_prompts
    from bench.raw_agent_bench import raw_agent_trace
    from kvreuse.models.tiny import tiny_words
    from kvreuse.models.trace import agent_trace

    words = tiny_words(tok.vocab_size if tok.vocab_size > 512 else 4096)
    if name in ("raw", "raw_fresh"):
        tr = raw_agent_trace(6, window=5, frame_words=160, sep_words=3, system_words=64, question_words=16,
                             seed=seed, words=words, separators="fresh" if name == "raw_fresh" else "fixed")
        return [t["prompt"] for t in tr]
    if name in ("rag", "rag_space"):
        return rag_prompts(48, passages=12, per_prompt=4, joiner="\n\n" if name == "rag" else " ",
                           question_words=16, seed=seed, words=words)
    if name == "chat":
        return [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
                for m in agent_trace(6, seed=seed, frame_words=160, system_words=64, vocab_size=4096)]
    raise ValueError(name)


def replay(name: str, seed: int, tok, chunking: ChunkingConfig, cost: CostConfig, block_size: int = 128) -> list[Turn]:
    boundary = frozenset(i for i in tok.convert_tokens_to_ids(list(chunking.boundary_tokens)) if i is not None)
    end = frozenset(e[0] for e in (tok.encode(t, add_special_tokens=False) for t in chunking.end_tokens)
                    if len(e) == 1)
    r = Replay(chunking, cost, boundary_ids=boundary, end_ids=end, block_size=block_size)
    return [r.run(tok.encode(p)) for p in trace_prompts(name, seed, tok)]


def totals(turns: list[Turn]) -> dict:
    out = {"tokens": sum(t.tokens for t in turns), "placed": sum(t.placed for t in turns),
           "prefix_hit": sum(t.prefix_hit for t in turns), "old": sum(t.old for t in turns),
           "turns": len(turns), "computed_segments": sum(t.computed_segments for t in turns)}
    g, pol = Counter(), Counter()
    for t in turns:
        g.update(t.gaps)
        pol.update({"claims " + k: v for k, v in t.policies.items()})
    return {**out, **{r: g[r] for r in REASONS}, **pol}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", action="append", choices=["raw", "raw_fresh", "rag", "rag_space", "chat"])
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--chunking", default="{}", help="JSON overrides of the connector's 'chunking' section")
    ap.add_argument("--cost", default="{}", help="JSON overrides of the connector's 'cost' section")
    ap.add_argument("--block-size", type=int, default=128, help="vLLM's block size (its prefix hits are whole blocks)")
    ap.add_argument("--turns-detail", action="store_true", help="print every turn of every seed")
    a = ap.parse_args()
    chunking = ChunkingConfig(**json.loads(a.chunking))
    cost = CostConfig(**json.loads(a.cost))
    tok = tokenizer()
    print(f"chunking {asdict(chunking)}\ncost {asdict(cost)}\nvLLM block size {a.block_size}")
    hdr = f"{'tokens':>7} {'old':>6} {'placed':>7} {'pfx':>5} {'steps':>5} | " + " ".join(f"{r:>9}" for r in REASONS)
    for name in a.trace or ["raw", "raw_fresh", "rag", "rag_space", "chat"]:
        print(f"\n{name} (from the 2nd prompt on; shares of prompt tokens)\n{'seed':>6} {hdr}")
        agg = Counter()
        for s in range(a.seeds):
            seed = 1000 * (s + 1) if name != "chat" else 1000 + s
            turns = replay(name, seed, tok, chunking, cost, a.block_size)
            if a.turns_detail:
                for i, t in enumerate(turns):
                    print(f"  t{i + 1:<3} {row(totals([t]))}")
            tot = totals(turns[1:])
            agg.update(tot)
            print(f"{seed:>6} {row(tot)}")
        print(f"{'all':>6} {row(agg)}")
        print(f"{'':>6} claims by policy: " + ", ".join(f"{k[7:]} {v}" for k, v in sorted(agg.items()) if k.startswith("claims ")))
    return 0


def row(t: dict) -> str:
    n = t["tokens"]
    return (f"{n:>7} {t['old'] / n:>6.1%} {t['placed'] / n:>7.1%} {t['prefix_hit'] / n:>5.0%} "
            f"{t['computed_segments'] / t['turns']:>5.2f} | "
            + " ".join(f"{t[r] / n:>9.1%}" for r in REASONS))


if __name__ == "__main__":
    sys.exit(main())
