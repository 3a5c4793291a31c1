"""Cut a prompt into chunks that come out the same wherever their content sits.

Cuts, in order of precedence:
  * a multimodal item is exactly its placeholder span (`mm_features`: identifier, offset, length);
    no cut falls inside it and its identifier joins the chunk's key;
  * a *start* boundary token (a chat message start) always starts a new chunk; an *end*
    boundary token (a paragraph break, where the tokenizer has one) always ends one;
  * inside text, a content-defined cut: a gear rolling hash over token ids; a cut follows token
    i when the hash's top bits are zero and the chunk has ≥ `min_tokens`; past `3 · avg_tokens`
    without one, a weaker test (2 top bits) takes over, so a long unlucky run still ends on a
    content-defined cut; `max_tokens` forces one.

The rolling hash restarts at every boundary and at both ends of every media item, so the text
between two such points is cut from its own tokens only: the same caption next to the same image,
or the same passage between two paragraph breaks, is the same chunk at any offset in any prompt.
Runs in O(n) numpy work plus O(chunks) Python steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from kvreuse.connector.config import ChunkingConfig

_GEAR = np.random.default_rng(0x6B767275).integers(0, 2**63, size=4096, dtype=np.uint64)
# the gear hash's top bits depend on the last 8 tokens only: cuts resynchronise 8 tokens after a change point
# (a 16-token window cost ~7 more tokens per change point on the raw-text agent trace: bench/gap_analysis.py)
_WINDOW = 8


@dataclass(frozen=True)
class MMSpan:
    """A multimodal item's placeholder: tokens `[offset, offset + length)` carry item `identifier`."""

    identifier: str
    offset: int
    length: int


@dataclass(frozen=True)
class Chunk:
    """Tokens `[start, end)` of the prompt; `mm_ids` are the identifiers of media inside it."""

    start: int
    end: int
    mm_ids: tuple[str, ...] = ()

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


def mm_spans(mm_features: Sequence | None) -> list[MMSpan]:
    """Placeholder spans of vLLM's `request.mm_features` (`MultiModalFeatureSpec`), sorted by offset."""
    out = []
    for f in mm_features or ():
        pos = f.mm_position
        out.append(MMSpan(str(f.identifier), int(pos.offset), int(pos.length)))
    return sorted(out, key=lambda s: s.offset)


def segment(token_ids: Sequence[int], cfg: ChunkingConfig, *, boundary_ids: frozenset[int] = frozenset(),
            end_ids: frozenset[int] = frozenset(), spans: Sequence[MMSpan] = ()) -> list[Chunk]:
    """Chunks covering `token_ids` exactly, in order.

    `boundary_ids`: tokens that start a chunk; `end_ids`: tokens that end one; `spans`: media items.
    """
    ids = np.asarray(token_ids, dtype=np.int64)
    n = ids.shape[0]
    if n == 0:
        return []
    # region starts: text between two of them is cut from its own tokens only
    starts = np.zeros(n + 1, dtype=bool)
    starts[0] = True
    if boundary_ids:
        starts[:n] |= np.isin(ids, np.fromiter(boundary_ids, dtype=np.int64))
    if end_ids:
        starts[1:] |= np.isin(ids, np.fromiter(end_ids, dtype=np.int64))
    media: dict[int, MMSpan] = {}
    prev_end = 0
    for s in spans:
        if s.offset < prev_end or s.length <= 0 or s.offset >= n:
            continue  # overlapping or empty placeholders: keep the first
        end = min(n, s.offset + s.length)
        starts[s.offset + 1:end] = False  # never cut inside an item
        starts[s.offset] = starts[end] = True
        media[s.offset] = s
        prev_end = end
    starts[n] = True
    hits = _hash_hits(ids, starts, cfg)
    weak = _hash_hits(ids, starts, cfg, bits=2)
    chunks: list[Chunk] = []
    bounds = np.flatnonzero(starts)
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        s = media.get(a)
        if s is not None:
            chunks.append(Chunk(a, b, (s.identifier,)))
        elif b - a <= cfg.min_tokens:
            chunks.append(Chunk(a, b))  # too short to cut
        else:
            _cut_text(a, b, hits, weak, cfg, chunks)
    return chunks


def _hash_hits(ids: np.ndarray, starts: np.ndarray, cfg: ChunkingConfig, bits: int | None = None) -> np.ndarray:
    """Sorted token indices i after which a content-defined cut may fall (the gear hash's top bits are 0).

    h_i = Σ_k g[i-k] << k over the tokens since the last region start (mod 2^64).
    """
    n = ids.shape[0]
    if bits is None:
        bits = max(1, int(np.log2(max(cfg.avg_tokens - cfg.min_tokens, 2))))
    idx = np.arange(n, dtype=np.int64)
    dist = idx - np.maximum.accumulate(np.where(starts[:n], idx, 0))  # tokens since i's region start
    # doubling: with H_m[i] = Σ_{k < min(m, dist_i + 1)} g[i-k] << k, H_2m[i] = H_m[i] + (H_m[i-m] << m) when dist_i >= m
    h = _GEAR[ids % _GEAR.shape[0]]
    m = 1
    with np.errstate(over="ignore"):
        while m < _WINDOW:
            tail = np.zeros(n, dtype=np.uint64)
            tail[m:] = h[:-m] << np.uint64(m)
            h = h + np.where(dist >= m, tail, np.uint64(0))
            m *= 2
    return np.flatnonzero((h >> np.uint64(64 - bits)) == 0)


def _cut_text(a: int, b: int, hits: np.ndarray, weak: np.ndarray, cfg: ChunkingConfig, out: list[Chunk]) -> None:
    """Content-defined chunks of text tokens `[a, b)`."""
    start = a
    while start < b:
        earliest, latest = start + cfg.min_tokens - 1, start + cfg.max_tokens - 1
        patience = start + 3 * cfg.avg_tokens - 1
        j = int(np.searchsorted(hits, earliest))
        cut = int(hits[j]) if j < hits.shape[0] else b
        if cut > patience:
            j = int(np.searchsorted(weak, patience))
            cut = min(cut, int(weak[j]) if j < weak.shape[0] else b)
        if cut > latest:
            cut = latest
        if cut >= b - 1:
            out.append(Chunk(start, b))
            return
        out.append(Chunk(start, cut + 1))
        start = cut + 1
