"""Reuse conditions of the quality benchmark and the measures taken on them.

Every condition builds the KV of a context's chunks in some way and answers the questions with the
reference encoder's model attending to that KV:

* ``full``       — everything computed in context (truth).
* ``blind``      — each chunk encoded alone at position 0, relocated to its offset.
* ``patch_rR``   — blind base + a patch fitted on this very context's residue, rank exactly R per
                   (layer, K|V, head) (energy 1.0, capped at R; `patch_r0` is blind).
* ``patch_default`` and variants — `fit_patch` with its defaults / other energy, layer or K|V choices.
* ``survival``   — in-context KV of [c0, c1, c2]; c0 is dropped, c1 and c2 move to the front.
* ``reorder``    — contexts whose chunks 0 and 1 are independent: base + default patch fitted in
                   order [c0, c1, c2] and used in order [c1, c0, c2]; truth = full prefill of the new order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from kvreuse.patch import Patch, fit_patch, relocate_and_patch
from bench.quality import task
from kvreuse.reference.encoder import ChunkKV, ReferenceEncoder

RANKS = (0, 1, 2, 4, 8, 16, 32)


@dataclass
class Encoded:
    """An example's KV: in-context (`full`, per chunk, at the in-context positions) and base
    (each chunk alone at position 0), plus the residue in the base frame."""

    example: task.Example
    offsets: list[int]
    full: list[ChunkKV]
    base: list[ChunkKV]
    delta_k: list[torch.Tensor]
    delta_v: list[torch.Tensor]


def chunk_offsets(ex: task.Example, order: Sequence[int] | None = None) -> list[int]:
    """Start position of each chunk (indexed by chunk) when laid out in `order`."""
    order = list(order) if order is not None else list(range(len(ex.chunks)))
    offs, pos = [0] * len(ex.chunks), 0
    for i in order:
        offs[i] = pos
        pos += len(ex.chunk_tokens(i))
    return offs


def encode_example(enc: ReferenceEncoder, ex: task.Example, order: Sequence[int] | None = None) -> Encoded:
    order = list(order) if order is not None else list(range(len(ex.chunks)))
    offs = chunk_offsets(ex, order)
    toks = [t for i in order for t in ex.chunk_tokens(i)]
    kv = enc.encode(toks, start=0)
    full: list[ChunkKV] = [None] * len(ex.chunks)  # type: ignore[list-item]
    for i in order:
        n = len(ex.chunk_tokens(i))
        full[i] = kv.slice(offs[i], offs[i] + n)
    base = [enc.encode(ex.chunk_tokens(i), start=0) for i in range(len(ex.chunks))]
    dks, dvs = [], []
    for i in range(len(ex.chunks)):
        # in-context keys moved into the base frame (positions 0..n), minus the base
        k_ctx = _move(full[i].k, full[i].positions, base[i].positions, enc)
        dks.append(k_ctx - base[i].k)
        dvs.append(full[i].v - base[i].v)
    return Encoded(ex, offs, full, base, dks, dvs)


def _move(k: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, enc: ReferenceEncoder) -> torch.Tensor:
    from kvreuse import relocate

    if torch.equal(src, dst):
        return k
    return relocate(k, src, dst, enc.rope)


def place(enc: ReferenceEncoder, kv: ChunkKV, dst_start: int, patch: Patch | None = None) -> ChunkKV:
    """`kv` (any frame) relocated to `[dst_start, dst_start + n)`, with an optional patch applied in
    kv's own frame first."""
    dst = enc.positions(dst_start, kv.num_tokens)
    if patch is None:
        return ChunkKV(_move(kv.k, kv.positions, dst, enc), kv.v, dst)
    k, v = relocate_and_patch(kv.k, kv.v, kv.positions, dst, enc.rope, patch)
    return ChunkKV(k, v, dst)


# ------------------------------------------------------------------------------------- patches
@dataclass(frozen=True)
class PatchRule:
    """How a condition fits its patches (None layers/kinds = all)."""

    max_rank: int = 16
    energy: float = 0.99
    budget: float | None = 0.05  # fit_patch's default byte budget; None = exactly the energy/max_rank ranks
    k_weight: float = 0.1        # fit_patch's default weight of K against V under a budget
    negligible: float = 1e-3
    layers: tuple[int, ...] | None = None
    kinds: str = "kv"            # "kv", "k" or "v"

    def fit(self, e: Encoded, i: int) -> Patch | None:
        dk, dv = e.delta_k[i], e.delta_v[i]
        if float(dk.abs().max()) == 0 and float(dv.abs().max()) == 0:
            return None                                            # chunk 0: nothing absorbed
        p = fit_patch(dk, dv, energy=self.energy, max_rank=self.max_rank, budget=self.budget,
                      k_weight=self.k_weight, base_k=e.base[i].k,
                      base_v=e.base[i].v, negligible=self.negligible)
        keep = lambda l, kind: (self.layers is None or l in self.layers) and kind in self.kinds
        p.k = [f if keep(l, "k") else None for l, f in enumerate(p.k)]
        p.v = [f if keep(l, "v") else None for l, f in enumerate(p.v)]
        return p


def patched_chunks(enc: ReferenceEncoder, e: Encoded, rule: PatchRule | None, order: Sequence[int],
                   fit_from: Encoded | None = None) -> tuple[list[ChunkKV], list[float]]:
    """Base (+ patch fitted on `fit_from`, default `e`) of each chunk, placed at `e`'s offsets.
    Returns the chunk KVs (indexed by chunk) and each patched chunk's patch bytes / KV bytes."""
    src = fit_from or e
    out: list[ChunkKV] = [None] * len(e.full)  # type: ignore[list-item]
    fracs = []
    for i in order:
        p = rule.fit(src, i) if rule is not None and rule.max_rank > 0 else None
        out[i] = place(enc, src.base[i], e.offsets[i], p)
        if i != order[0] or src.offsets[i] != 0:
            kv_bytes = src.base[i].k.nbytes + src.base[i].v.nbytes
            fracs.append((p.nbytes if p is not None else 0) / kv_bytes)
    return out, fracs


# ------------------------------------------------------------------------------------- answering
@torch.no_grad()
def question_logits(enc: ReferenceEncoder, past: ChunkKV, questions: Sequence[task.Question]) -> torch.Tensor:
    """fp32 logits `[len(questions), vocab]` at each question's last token; every question is its
    own sequence right after `past`: all questions run as one batch row whose 4-D attention mask lets
    each question see the past and its own tokens only (same positions for every question)."""
    from transformers import DynamicCache

    n = past.num_tokens
    lens = [len(q.tokens) for q in questions]
    ids = torch.tensor([t for q in questions for t in q.tokens], dtype=torch.long).view(1, -1)
    total = ids.shape[1]
    pos = torch.cat([enc.positions(n, l) for l in lens], -1)
    allow = torch.zeros(total, n + total, dtype=torch.bool)
    allow[:, :n] = True
    ends, s = [], 0
    for l in lens:
        allow[s:s + l, n + s:n + s + l] = torch.ones(l, l, dtype=torch.bool).tril()
        s += l
        ends.append(s - 1)
    cache = DynamicCache(ddp_cache_data=enc._to_hf(past)) if n else DynamicCache()
    out = enc.model(input_ids=ids.to(enc.device), position_ids=enc._position_ids(pos),
                    attention_mask=allow[None, None].to(enc.device), past_key_values=cache, use_cache=False)
    return out.logits[0, ends].float().cpu()


@dataclass
class Tally:
    """Per-condition accumulators."""

    correct: dict[str, list[int]] = field(default_factory=dict)     # question class -> 0/1 list
    kl: dict[str, list[float]] = field(default_factory=dict)
    frac: list[float] = field(default_factory=list)
    err_k: list[torch.Tensor] = field(default_factory=list)          # per-layer relative error
    err_v: list[torch.Tensor] = field(default_factory=list)

    def add(self, cls: str, ok: bool, kl: float | None) -> None:
        self.correct.setdefault(cls, []).append(int(ok))
        if kl is not None:
            self.kl.setdefault(cls, []).append(kl)

    def acc(self, cls: str) -> float | None:
        xs = self.correct.get(cls)
        return sum(xs) / len(xs) if xs else None

    def summary(self) -> dict:
        out = {c: self.acc(c) for c in sorted(self.correct)}
        out["n"] = {c: len(v) for c, v in sorted(self.correct.items())}
        out["kl"] = {c: sum(v) / len(v) for c, v in sorted(self.kl.items())}
        if self.frac:
            out["patch_bytes_frac"] = sum(self.frac) / len(self.frac)
        if self.err_k:
            out["rel_err_k"] = torch.stack(self.err_k).mean(0).tolist()
            out["rel_err_v"] = torch.stack(self.err_v).mean(0).tolist()
        return out


def question_class(q: task.Question) -> str:
    return {1: "hop1", 2: "hop2", 3: "hop3"}[q.depth]


def kl_div(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p_ref || p) per row, nats."""
    lp_ref, lp = ref_logits.log_softmax(-1), logits.log_softmax(-1)
    return (lp_ref.exp() * (lp_ref - lp)).sum(-1)


def rel_err(parts: Sequence[ChunkKV], truth: Sequence[ChunkKV]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer ‖X − X_full‖_F / ‖X_full‖_F over the given chunks. # [num_layers] each"""
    k = torch.cat([p.k for p in parts], 1).float()
    v = torch.cat([p.v for p in parts], 1).float()
    tk = torch.cat([p.k for p in truth], 1).float()
    tv = torch.cat([p.v for p in truth], 1).float()
    f = lambda a, b: torch.linalg.vector_norm((a - b).flatten(1), dim=1) / torch.linalg.vector_norm(b.flatten(1), dim=1)
    return f(k, tk), f(v, tv)


def spectrum(delta: torch.Tensor) -> torch.Tensor:
    """Cumulative captured energy by rank, per layer, averaged over heads. delta: `[L, N, H, D]`;
    returns `[L, min(N, D)]` (NaN rows for all-zero layers)."""
    m = delta.float().permute(0, 2, 1, 3)                         # [L, H, N, D]
    s = torch.linalg.svdvals(m).square()                           # [L, H, k]
    cum = s.cumsum(-1) / s.sum(-1, keepdim=True)
    return cum.mean(1)


def score(enc: ReferenceEncoder, tally: Tally, past: ChunkKV, questions: Sequence[task.Question],
          ref_logits: torch.Tensor | None, classify: Callable[[task.Question], str | None] = question_class) -> torch.Tensor:
    logits = question_logits(enc, past, questions)
    kls = kl_div(ref_logits, logits) if ref_logits is not None else None
    pred = logits.argmax(-1)
    for j, q in enumerate(questions):
        cls = classify(q)
        if cls is not None:
            tally.add(cls, int(pred[j]) == q.answer_id, None if kls is None else float(kls[j]))
    return logits


def finite_mean(rows: list[torch.Tensor]) -> list[list[float]]:
    x = torch.stack(rows)
    x = torch.where(torch.isfinite(x), x, torch.nan)
    m = x.nanmean(0)
    return [[None if math.isnan(v) else round(v, 6) for v in row] for row in m.tolist()]
