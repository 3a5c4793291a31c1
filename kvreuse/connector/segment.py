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

import bisect
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import xxhash

from kvreuse.connector.config import ChunkingConfig

_GEAR = np.random.default_rng(0x6B767275).integers(0, 2**63, size=4096, dtype=np.uint64)
# the gear hash's top bits depend on the last 8 tokens only: cuts resynchronise 8 tokens after a change point
# (a 16-token window cost ~7 more tokens per change point on the raw-text agent trace: bench/gap_analysis.py)
_WINDOW = 8
_ANCHOR_BITS = 2  # an anchor at about one position in four (`Anchors`)


class Anchors:
    """Content fingerprints of a prompt, to tell whether text computed in a gap was there before.

    An anchor is the rolling hash of the (up to) `_WINDOW` tokens ending at a position, kept at about
    one position in `1 << _ANCHOR_BITS` (chosen by the hash itself, so by content, never by offset),
    plus one per media item (its identifier).  The hash restarts with the chunker's regions, so an
    anchor depends on content only: the same text yields the same anchors at any offset.  A change
    point (a dropped passage, a prompt that starts mid-text) changes only the hashes whose windows
    cross it, fewer than `_WINDOW` consecutive positions; new text changes every hash over it.
    """

    __slots__ = ("pos", "hashes", "media", "_index")

    def __init__(self, pos: np.ndarray, hashes: np.ndarray, media: np.ndarray) -> None:
        self.pos, self.hashes, self.media = pos, hashes, media  # sorted by position
        self._index: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def empty(cls) -> "Anchors":
        return cls(np.zeros(0, np.int64), np.zeros(0, np.uint64), np.zeros(0, bool))

    @classmethod
    def of(cls, h: np.ndarray, media: dict[int, "MMSpan"]) -> "Anchors":
        keep = ((h >> np.uint64(20)) & np.uint64((1 << _ANCHOR_BITS) - 1)) == 0
        for off, s in media.items():
            keep[off:off + s.length] = False  # placeholder tokens: the item's identifier stands for them
        pos = np.flatnonzero(keep)
        hashes = h[pos]
        flags = np.zeros(pos.shape[0], bool)
        if media:
            mpos = np.fromiter(media, np.int64, len(media))
            mh = np.array([xxhash.xxh64_intdigest(s.identifier.encode()) for s in media.values()], np.uint64)
            pos, hashes = np.concatenate([pos, mpos]), np.concatenate([hashes, mh])
            flags = np.concatenate([flags, np.ones(len(media), bool)])
            order = np.argsort(pos, kind="stable")
            pos, hashes, flags = pos[order], hashes[order], flags[order]
        return cls(pos.astype(np.int64), hashes, flags)

    @property
    def nbytes(self) -> int:
        return self.pos.nbytes + self.hashes.nbytes + self.media.nbytes + 2 * self.hashes.nbytes

    def release(self) -> None:
        """Forget the fingerprints (memory budget): `first_seen` then knows nothing."""
        self.pos, self.hashes, self.media, self._index = (np.zeros(0, np.int64), np.zeros(0, np.uint64),
                                                          np.zeros(0, bool), None)

    @property
    def known(self) -> bool:
        return self.pos.shape[0] > 0

    def first_seen(self, hashes: np.ndarray) -> np.ndarray:
        """For each hash, the first position of this prompt holding it (int64 max where none)."""
        if self._index is None:
            order = np.lexsort((self.pos, self.hashes))
            h, p = self.hashes[order], self.pos[order]
            first = np.ones(h.shape[0], bool)
            first[1:] = h[1:] != h[:-1]
            self._index = (h[first], p[first])
        h, p = self._index
        out = np.full(hashes.shape[0], np.iinfo(np.int64).max, np.int64)
        if h.shape[0]:
            i = np.minimum(np.searchsorted(h, hashes), h.shape[0] - 1)
            hit = h[i] == hashes
            out[hit] = p[i[hit]]
        return out


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
    return segment_prompt(token_ids, cfg, boundary_ids=boundary_ids, end_ids=end_ids, spans=spans)[0]


def segment_prompt(token_ids: Sequence[int], cfg: ChunkingConfig, *, boundary_ids: frozenset[int] = frozenset(),
                   end_ids: frozenset[int] = frozenset(), spans: Sequence[MMSpan] = ()) -> tuple[list[Chunk], Anchors]:
    """`segment`, and the prompt's content anchors (`Anchors`) from the same rolling hash."""
    ids = np.asarray(token_ids, dtype=np.int64)
    n = ids.shape[0]
    if n == 0:
        return [], Anchors.empty()
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
    h = _window_hash(ids, starts)
    # as lists: the cut loop looks each one up once per chunk (bisect on a list is ~10x numpy's scalar call)
    hits = _top_zero(h, max(1, int(np.log2(max(cfg.avg_tokens - cfg.min_tokens, 2))))).tolist()
    weak = _top_zero(h, 2).tolist()
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
    return chunks, Anchors.of(h, media)


def _window_hash(ids: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Gear hash at each token over the last `_WINDOW` tokens since its region start.

    h_i = Σ_k g[i-k] << k over the tokens since the last region start (mod 2^64).
    """
    n = ids.shape[0]
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
    return h


def _top_zero(h: np.ndarray, bits: int) -> np.ndarray:
    """Sorted token indices i after which a content-defined cut may fall (the hash's top `bits` are 0)."""
    return np.flatnonzero((h >> np.uint64(64 - bits)) == 0)


def _cut_text(a: int, b: int, hits: list[int], weak: list[int], cfg: ChunkingConfig, out: list[Chunk]) -> None:
    """Content-defined chunks of text tokens `[a, b)` (`hits`, `weak`: sorted candidate cut positions)."""
    start = a
    while start < b:
        earliest, latest = start + cfg.min_tokens - 1, start + cfg.max_tokens - 1
        patience = start + 3 * cfg.avg_tokens - 1
        j = bisect.bisect_left(hits, earliest)
        cut = hits[j] if j < len(hits) else b
        if cut > patience:
            j = bisect.bisect_left(weak, patience)
            cut = min(cut, weak[j] if j < len(weak) else b)
        if cut > latest:
            cut = latest
        if cut >= b - 1:
            out.append(Chunk(start, b))
            return
        out.append(Chunk(start, cut + 1))
        start = cut + 1
