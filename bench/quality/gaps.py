"""What segmented prefill should answer on raw-text prompts, computed with the reference model.

The server conditions in raw text (`bench.quality.server`, `raw=True`) send each prompt as one
text, cut by content into chunks: after a change point (a dropped or moved context) the chunk that
straddles it is new and computed in place (a gap), while the chunks inside each context are placed
from the store.  This module reproduces that prompt by prompt with the reference encoder, so that
the server's answers can be compared with exactly what gap-fill is meant to compute:

* every prompt is cut with kvreuse's own chunker (`kvreuse.connector.segment.segment`) and the
  server's chunking config;
* the priming prompts of a context store their chunks (the first prompt that holds a chunk's tokens
  provides its KV, as the store's first entry does; chunks under `min_tokens` are not stored);
* a query chunk that is stored, does not hold the prompt's last token and belongs to a run of at
  least `min_tokens` placed tokens is *placed*: its stored KV relocated to its new position
  (`conditions.place`); every other chunk is computed attending to everything before it.

One KV per chunk is stored, so every policy (exact, survival, reorder, blind) serves that KV;
conditions whose server KV differs (recall: base + patch) are not reproduced here.
"""

from __future__ import annotations

from typing import Sequence

import torch

from bench.quality import task
from bench.quality.conditions import place
from bench.quality.server import ServerTally, sent_questions
from kvreuse.connector.config import ChunkingConfig
from kvreuse.connector.segment import segment
from kvreuse.reference.encoder import ChunkKV, ReferenceEncoder


def chunking(sizes: tuple[int, int, int]) -> ChunkingConfig:
    """The chunking of `server.raw_config(sizes)`: content-defined, no boundary or end tokens."""
    lo, avg, hi = sizes
    return ChunkingConfig(min_tokens=lo, avg_tokens=avg, max_tokens=hi, boundary_tokens=(), end_tokens=())


@torch.no_grad()
def extend(enc: ReferenceEncoder, tokens: Sequence[int], start: int, past: ChunkKV | None) -> tuple[torch.Tensor, ChunkKV]:
    """Logits `[n, vocab]` and K/V of `tokens` at positions `start..`, attending to `past` (a standard
    attention model: k, v `[layers, tokens, kv_heads, head_dim]`, keys after RoPE)."""
    from transformers import DynamicCache

    n_past = past.num_tokens if past is not None else 0
    data = [(past.k[i].transpose(0, 1).unsqueeze(0).contiguous(), past.v[i].transpose(0, 1).unsqueeze(0).contiguous())
            for i in range(past.k.shape[0])] if n_past else None
    cache = DynamicCache(ddp_cache_data=data) if data else DynamicCache()
    pos = enc.positions(start, len(tokens))
    out = enc.model(input_ids=torch.tensor([list(tokens)]), position_ids=pos.view(1, -1),
                    attention_mask=torch.ones(1, n_past + len(tokens), dtype=torch.long),
                    past_key_values=cache, use_cache=True)
    ks = [layer.keys[0, :, n_past:].transpose(0, 1) for layer in out.past_key_values.layers]   # [n, H, D]
    vs = [layer.values[0, :, n_past:].transpose(0, 1) for layer in out.past_key_values.layers]
    return out.logits[0].float(), ChunkKV(torch.stack(ks), torch.stack(vs), pos)


class Store:
    """Chunks of the priming prompts of one context: tokens -> KV as computed in its prompt."""

    def __init__(self, enc: ReferenceEncoder, cfg: ChunkingConfig, min_tokens: int) -> None:
        self.enc, self.cfg, self.min_tokens = enc, cfg, min_tokens
        self.kv: dict[tuple[int, ...], ChunkKV] = {}
        self._memo: dict[tuple[int, ...], tuple[list[ChunkKV], list[int], int]] = {}

    def prime(self, prompt: Sequence[int]) -> None:
        kv = self.enc.encode(list(prompt), start=0)
        for c in segment(list(prompt), self.cfg):
            key = tuple(prompt[c.start:c.end])
            if c.num_tokens >= self.min_tokens and key not in self.kv:
                self.kv[key] = kv.slice(c.start, c.end)

    def answer(self, prompt: Sequence[int]) -> tuple[int, int]:
        """(greedy next token, tokens placed) for `prompt` under gap-fill.

        Chunks are at least `min_tokens` long but the prompt's last one, which is never placed, so
        each stored chunk before it is placed (a run of at least `min_tokens`).  The state after each
        chunk boundary is kept (`_memo`), so the questions of one context share their prefix's work.
        """
        prompt = list(prompt)
        chunks = segment(prompt, self.cfg)
        limit = len(prompt) - 1
        parts: list[ChunkKV] = []
        pending: list[int] = []   # computed tokens not yet run
        n_placed, logits = 0, None

        def run() -> None:
            nonlocal logits
            if pending:
                past = ChunkKV.cat(parts) if parts else None
                logits, kv = extend(self.enc, [prompt[i] for i in pending], pending[0], past)
                parts.append(kv)
                pending.clear()

        for c in chunks[:-1]:  # every chunk but the last: its state depends on the prefix only
            key = tuple(prompt[:c.end])
            hit = self._memo.get(key)
            if hit is not None:
                parts, pending, n_placed = list(hit[0]), list(hit[1]), hit[2]
                continue
            tokens = tuple(prompt[c.start:c.end])
            if c.end <= limit and tokens in self.kv and c.num_tokens >= self.min_tokens:
                run()
                parts.append(place(self.enc, self.kv[tokens], c.start))
                n_placed += c.num_tokens
            else:
                pending.extend(range(c.start, c.end))
            self._memo[key] = (list(parts), list(pending), n_placed)
        pending.extend(range(chunks[-1].start, chunks[-1].end))
        run()
        assert logits is not None
        return int(logits[-1].argmax()), n_placed


def reference_preds(enc: ReferenceEncoder, main: Sequence[task.Example], reo: Sequence[task.Example],
                    sizes: tuple[int, int, int], min_tokens: int, *,
                    progress=lambda it, **kw: it) -> dict[str, dict]:
    """Gap-fill's answers to the questions `server.measure` sends in raw text, for the conditions whose
    placed KV is the stored KV (blind, survival, reorder; same priming prompts), keyed `gapfill_<cond>`:
    accuracy, per-context argmax (`_preds`, for agreement with the server) and the share of
    question-prompt tokens placed."""
    cfg = chunking(sizes)
    out = {}
    for cond, exs in (("blind", main), ("survival", main), ("reorder", reo)):
        tal, placed, total = ServerTally(), 0, 0
        for ex in progress(exs, desc=f"gap-fill {cond}"):
            c = [ex.chunk_tokens(i) for i in range(len(ex.chunks))]
            qs = sent_questions(ex)
            if cond == "survival":
                qs = [q for q in qs if q.chunk > 0]
            store = Store(enc, cfg, min_tokens)
            if cond == "blind":
                for part in c:
                    store.prime(part)
            else:
                store.prime(c[0] + c[1] + c[2] + qs[0].tokens)
            ctx = {"blind": c[0] + c[1] + c[2], "survival": c[1] + c[2], "reorder": c[1] + c[0] + c[2]}[cond]
            preds = []
            for q in qs:
                tok, n = store.answer(ctx + q.tokens)
                preds.append(tok)
                placed, total = placed + n, total + len(ctx) + len(q.tokens)
            tal.add(qs, preds)
        out[f"gapfill_{cond}"] = {"single_hop": tal.acc("hop1"), "multi_hop": tal.acc("hop3"), "hop2": tal.acc("hop2"),
                                  "n": {k: len(v) for k, v in sorted(tal.correct.items())}, "_preds": tal.preds,
                                  "placed_share": placed / total if total else None}
    return out
