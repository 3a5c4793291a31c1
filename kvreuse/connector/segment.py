"""Cut a prompt into chunks that come out the same wherever their content sits.

Three kinds of cut, in order of precedence:
  * a multimodal item is exactly its placeholder span (`mm_features`: identifier, offset, length);
    no cut falls inside it and its identifier joins the chunk's key;
  * a boundary token (a chat message start) always starts a new chunk;
  * inside text, a content-defined cut: a gear rolling hash over token ids (reset at each
    message start); a cut follows token i when the hash's top bits are zero and the chunk has
    ≥ `min_tokens`, or when it reaches `max_tokens`.  Cuts depend only on the message's own
    tokens, so the same message is cut the same way at any offset in any prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from kvreuse.connector.config import ChunkingConfig

_GEAR = np.random.default_rng(0x6B767275).integers(0, 2**63, size=4096, dtype=np.uint64)


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
            spans: Sequence[MMSpan] = ()) -> list[Chunk]:
    """Chunks covering `token_ids` exactly, in order."""
    n = len(token_ids)
    ids = np.asarray(token_ids, dtype=np.int64)
    cuts = _text_cuts(ids, cfg, boundary_ids)
    chunks: list[Chunk] = []
    span_at = {s.offset: s for s in spans}
    inside = np.zeros(n + 1, dtype=bool)  # inside[i]: no cut allowed before token i
    for s in spans:
        inside[s.offset + 1: s.offset + s.length] = True
    start = 0
    i = 0
    while i < n:
        s = span_at.get(i)
        if s is not None:
            if i > start:
                chunks.append(Chunk(start, i))
            end = min(n, s.offset + s.length)
            chunks.append(Chunk(i, end, (s.identifier,)))
            start = i = end
            continue
        i += 1
        if i < n and (cuts[i] and not inside[i]) and i > start:
            chunks.append(Chunk(start, i))
            start = i
    if start < n:
        chunks.append(Chunk(start, n))
    return chunks


def _text_cuts(ids: np.ndarray, cfg: ChunkingConfig, boundary_ids: frozenset[int]) -> np.ndarray:
    """cuts[i]: a chunk starts at token i (boundary tokens, content-defined cuts, max size)."""
    n = ids.shape[0]
    cuts = np.zeros(n + 1, dtype=bool)
    bits = max(1, int(np.log2(max(cfg.avg_tokens - cfg.min_tokens, 2))))
    shift = np.uint64(64 - bits)
    g = _GEAR[ids % _GEAR.shape[0]]
    one = np.uint64(1)
    h = np.uint64(0)
    length = 0
    with np.errstate(over="ignore"):
        for i in range(n):
            if i > 0 and int(ids[i]) in boundary_ids:
                cuts[i] = True
                length = 0
                h = np.uint64(0)
            # gear hash: the top bits depend on the last 64 token ids only
            h = (h << one) + g[i]
            length += 1
            if i + 1 < n and ((length >= cfg.min_tokens and (h >> shift) == 0) or length >= cfg.max_tokens):
                cuts[i + 1] = True
                length = 0
    return cuts
