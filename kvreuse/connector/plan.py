"""Segment planning, free of vLLM: which stored chunks of a prompt are placed, which are computed.

A prompt after vLLM's own prefix hit becomes alternating segments: *placed* (KV written from the
store) and *computed* (prefilled in place, attending to everything before it).  Every stored
chunk anywhere in the prompt is a candidate, and so are the edges of stored chunks inside a chunk
nobody stored (edge fill, below); the cost model (`kvreuse.connector.costs`) drops a
placement that would not pay for itself (a tiny chunk, or one whose extra scheduler step costs
more than the prefill it saves).  The request's fidelity (`kvreuse.connector.fidelity`) bounds the
policies: "exact" places only exact KV; "accurate" repairs approximate placements by computing in place
the first `repair` tokens after each change point: where an approximate chunk (or edge-fill piece) does
not follow the very chunk it was stored after (`_continues`).  The count runs across chunks: a chunk
shorter than the repair is computed whole and the rest comes off the next (the first tokens after a
change, the attention sinks of what follows, depend most on what precedes them).  The last prompt
token is always computed (vLLM samples from it).  A chunk that straddles the prefix hit is placed from
its first uncomputed token.

Without the segmented scheduler (`gaps=False`) only the placement that starts right at the
prefix hit can be used (vLLM's connector API claims a prefix): the first chunk that is not
placed ends the claim.  Planning is linear in the number of chunks.

Edge fill.  Where passages meet in one text, content-defined chunking leaves one chunk that
straddles the change point: the tail of one passage and the head of the next, a pair no earlier
prompt had.  Its start is the start of a stored chunk (the one that followed the same tail before)
and its end the end of another (the one that held the same head), so the planner places the common
prefix of the first and the common suffix of the second (`Directory.head` / `tail`), and computes
only what is left between them: nothing where the separator between the passages was seen before.
The chunk no longer ends a placement, so the request needs no extra step for it.  The prefix keeps
the policy its chunk would have there (exact after the same chunks); the suffix attended to other
text before it, so it is never exact: survival, reorder or blind, as for a chunk after a gap.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import torch

import numpy as np

from kvreuse.connector.claim import (LOOKBACK, MATCH, RECENT, DirEntry, Directory, GapText, LoadItem, SaveItem,
                                     choose_policy, prefix_signatures)
from kvreuse.connector.costs import CostModel
from kvreuse.connector.fidelity import repairs, tainted
from kvreuse.connector.mrope import as_tuple
from kvreuse.connector.segment import Anchors, Chunk


@dataclass(frozen=True)
class Placement:
    """Prompt tokens `[start, end)` placed from the store: `items`, contiguous, in order."""

    items: tuple[LoadItem, ...]

    @property
    def start(self) -> int:
        return self.items[0].dst_start

    @property
    def end(self) -> int:
        return self.items[-1].dst_end

    @property
    def num_tokens(self) -> int:
        return self.end - self.start

    @property
    def exact(self) -> bool:
        return all(it.policy == "exact" for it in self.items)

    @property
    def keys(self) -> set[bytes]:
        """Chunks this placement fills: its items' keys, and the prompt's own chunks that edge fill covered
        whole (`LoadItem.within`: never saved as computed, what they hold was placed)."""
        return {it.key for it in self.items} | {k for it in self.items for k in it.within}


@dataclass
class Plan:
    """The placements of one prompt after `num_computed` prefix-cached tokens."""

    num_computed: int
    placements: list[Placement] = field(default_factory=list)
    hits: int = 0      # chunks placed
    misses: int = 0    # chunks computed (not stored, refused by policy, or not worth placing)

    @property
    def leading(self) -> int:
        """Tokens placed right at the prefix hit (what vLLM's connector API can claim)."""
        p = self.placements[0] if self.placements else None
        return p.num_tokens if p is not None and p.start == self.num_computed else 0

    @property
    def placed_tokens(self) -> int:
        return sum(p.num_tokens for p in self.placements)

    @property
    def first_approximate(self) -> int | None:
        """First prompt position holding KV placed under a policy other than exact (None: none)."""
        for p in self.placements:
            for it in p.items:
                if it.policy != "exact":
                    return it.dst_start
        return None

    @property
    def items(self) -> list[LoadItem]:
        return [it for p in self.placements for it in p.items]

    @property
    def placed_keys(self) -> set[bytes]:
        """`Placement.keys` of every placement: what `plan_saves` must not save as computed."""
        return {k for p in self.placements for k in p.keys}


_PIECES = 4  # stored chunks edge fill may chain on each side of one gap


def plan_segments(token_ids: Sequence[int], chunks: Sequence[Chunk], keys: Sequence[bytes], directory: Directory,
                  num_computed: int, fidelity: str = "exact", positions: torch.Tensor | None = None,
                  cost: CostModel | None = None, gaps: bool = True, anchors: Anchors | None = None,
                  ns: bytes = b"", repair: int = 0, repair_every: bool = False) -> Plan:
    """Placements of the stored chunks of a prompt (pure: nothing is recorded).

    `positions`: the request's `[3, N]` M-RoPE positions (`kvreuse.connector.mrope`); each item
    then carries its destination positions.  Placements end on chunk boundaries and a media item
    is one chunk, so a placement never ends inside an image or video span.  `anchors`: the
    prompt's content anchors (`segment.segment_prompt`); with them, a chunk after gaps is survival
    or reorder only where a recorded context held the gaps' text (None: gaps are not checked).
    `ns`: the request's chunk namespace (`claim.chunk_namespace`), for edge fill.  `repair`: tokens
    computed from each change point on ("accurate"; from the start of every approximate chunk with
    `repair_every`).
    """
    repair = repair if repairs(fidelity) else 0
    limit = len(token_ids) - 1  # vLLM must compute at least the last prompt token
    plan = Plan(num_computed)
    run: list[LoadItem] = []
    stored: deque[bytes] = deque(maxlen=MATCH)  # stored chunks before the current one (gaps left out)
    spans: deque[tuple[int, int]] = deque(maxlen=MATCH)  # their token ranges
    stored_tokens = 0  # tokens of the chunks in `spans`
    open_run = True  # gaps=False: only the run that starts at the prefix hit
    memo: dict = {}
    seen: dict = {}  # recorded prompts' anchor lookups, shared by every gap check of this plan

    def close() -> None:
        nonlocal run
        if run:
            p = Placement(tuple(run))
            leading = p.start == num_computed
            if cost is None or cost.pays(p.num_tokens, leading):
                plan.placements.append(p)
                plan.hits += len(run)
            else:
                plan.misses += len(run)
            run = []

    last: tuple[bytes, int] | None = None  # (key, end) of the stored chunk whose KV ends last here, whole (None: since
    # then text was computed) -- placed, before its repair, or in vLLM's prefix hit
    owed = 0  # repair tokens still to compute since the last change point

    def repaired(it: LoadItem) -> LoadItem | None:
        """`it` less the repair it owes (None: all of it computed instead): an approximate item after a change
        point (`_continues`) starts `repair` tokens of recompute, counted across the items after it."""
        nonlocal last, owed
        prev, last = last, ((it.key, it.dst_end) if it.src_end == len(it.token_ids) else None)
        if it.policy == "exact":
            owed = 0
            return it
        if repair_every or not _continues(prev, it, directory):
            owed = repair
        cut = min(owed, it.num_tokens)
        owed -= cut
        return _trimmed(it, cut, positions)

    tok: np.ndarray | None = None  # the prompt as an array, for edge fill (made at the first unstored chunk)
    filled = num_computed  # end of the last placed token
    max_chunk = max((c.num_tokens for c in chunks), default=0)
    text_from = 0  # start of the text since the last media item

    def policy(e: DirEntry, key: bytes, sig: bytes, hi: int) -> tuple[str, bytes] | None:
        """`choose_policy` for KV of `key` placed at `hi` with the current stored neighbours (memoized)."""
        if sig in e.contexts and sig not in e.demoted:
            return "exact", sig
        # the looser matches depend on the key, its stored neighbours and the gaps among them
        lo = max(spans[0][0] if len(spans) == MATCH else 0, hi - LOOKBACK)
        gap = anchors is not None and hi - lo > _sum_in(spans, lo, stored_tokens)
        memo_key = (key, tuple(stored), (lo, hi) if anchors is not None else None)
        if memo_key not in memo:
            text = GapText(anchors, lo, hi, seen) if anchors is not None else None
            memo[memo_key] = choose_policy(e, sig, stored, fidelity, text if gap else None, text)
        return memo[memo_key]

    for j, (c, sig) in enumerate(zip(chunks, prefix_signatures(keys))):
        if c.mm_ids:
            text_from = c.end
        e = directory.get(keys[j])
        ok = e is not None and e.num_tokens == c.num_tokens
        if c.end <= num_computed:
            last = (keys[j], c.end)  # in vLLM's prefix hit: exact, whatever the store holds
        elif c.end <= limit and open_run:
            pick = policy(e, keys[j], sig, c.start) if ok else None
            edges: list[LoadItem] = []
            if pick is None and gaps and not ok and not c.mm_ids and c.start >= num_computed:
                if tok is None:
                    tok = np.asarray(token_ids, dtype=np.int32)
                # the computed text before it (unplaced, up to one longest chunk) may end in the same suffix
                edges = _edge_fill(tok, c, max(filled, c.start - max_chunk, text_from), sig, directory, policy,
                                   positions, ns)
            filled_text = bool(edges)  # stored text here, placed or (repair) computed
            if repair:
                edges = [r for it in edges if (r := repaired(it)) is not None]
            if edges:
                for it in edges:
                    if run and run[-1].dst_end != it.dst_start:
                        close()
                    run.append(it)
                filled = edges[-1].dst_end
                if sum(it.num_tokens for it in edges) < c.num_tokens:
                    plan.misses += 1
            elif pick is None:  # computed (the run it ends is closed by the next placement, or at the end)
                plan.misses += 1
                open_run = gaps
                if not filled_text:
                    last = None
            else:
                start = max(c.start, num_computed)
                dst_pos = as_tuple(positions[:, start:c.end]) if positions is not None else None
                item = LoadItem(keys[j], tuple(token_ids[c.start:c.end]), start - c.start, c.num_tokens, start,
                                pick[1], pick[0], dst_pos)
                if repair:
                    item = repaired(item)
                if item is None:
                    plan.misses += 1
                else:
                    if run and run[-1].dst_end != item.dst_start:
                        close()
                    filled = c.end
                    run.append(item)
        elif num_computed < c.end <= limit:
            plan.misses += 1  # after the claim ended (gaps=False)
        if ok:
            if len(spans) == MATCH:
                stored_tokens -= spans[0][1] - spans[0][0]
            stored.append(keys[j])
            spans.append((c.start, c.end))
            stored_tokens += c.num_tokens
    close()
    if not gaps:
        plan.placements = plan.placements[:1] if plan.leading else []
    _mark_filled(plan, chunks, keys, directory)
    return plan


def _continues(prev: tuple[bytes, int] | None, it: LoadItem, directory: Directory) -> bool:
    """Whether `it` follows the very chunk it was stored after: `prev` (key, end), the stored chunk whose KV
    ends right where `it` starts, is the last key of the context `it` is read from.  Where it does not
    (computed text before it, another chunk, its own middle), its context changed: a change point."""
    if prev is None or prev[1] != it.dst_start or it.src_start:
        return False
    e = directory.get(it.key)
    rec = e.contexts.get(it.context, ()) if e is not None else ()
    return bool(rec) and rec[-1] == prev[0]


def _trimmed(it: LoadItem, cut: int, positions: torch.Tensor | None) -> LoadItem | None:
    """`it` less its first `cut` tokens (computed in place instead); None when nothing of it is left to place."""
    if cut <= 0:
        return it
    if cut >= it.num_tokens:
        return None
    dst = it.dst_start + cut
    dst_pos = as_tuple(positions[:, dst:it.dst_end]) if positions is not None else None
    return dataclasses.replace(it, src_start=it.src_start + cut, dst_start=dst, dst_pos=dst_pos)


def _edge_fill(tok: np.ndarray, c: Chunk, back: int, sig: bytes, directory: Directory, policy,
               positions: torch.Tensor | None, ns: bytes) -> list[LoadItem]:
    """Edge fill of chunk `c` (text nobody stored): the common prefix of the stored chunk that starts
    as `c` does, placed at `c.start`, and the common suffix of the one that ends as the rest of `c`
    does, placed to end at `c.end`, reaching back as far as `back` (computed text before `c`); each
    only where its policy allows it.  A piece that is a whole stored chunk is followed (preceded) by
    the next lookup, at most `_PIECES` pieces a side.  What is left between them is computed."""
    heads: list[LoadItem] = []
    start, end = c.start, c.end
    while start < end and len(heads) < _PIECES:
        found = directory.head(tok, start, end, ns)
        pick = policy(found[1], found[0], sig if start == c.start else b"", start) if found else None
        if pick is None:
            break
        digest, e, n = found
        heads.append(_piece(digest, e, 0, n, start, pick, positions))
        start += n
        if n < e.num_tokens:
            break
    if start == c.start:
        start = back
    tails: list[LoadItem] = []
    while start < end and len(tails) < _PIECES:
        found = directory.tail(tok, start, end, ns)
        pick = policy(found[1], found[0], b"", end - found[2]) if found else None  # never exact: other text before
        if pick is None:
            break
        digest, e, n = found
        tails.append(_piece(digest, e, e.num_tokens - n, e.num_tokens, end - n, pick, positions))
        end -= n
        if n < e.num_tokens:
            break
    return heads + tails[::-1]


def _piece(digest: bytes, e: DirEntry, src_start: int, src_end: int, dst: int, pick: tuple[str, bytes],
           positions: torch.Tensor | None) -> LoadItem:
    assert e.tokens is not None
    n = src_end - src_start
    dst_pos = as_tuple(positions[:, dst:dst + n]) if positions is not None else None
    return LoadItem(digest, tuple(e.tokens.tolist()), src_start, src_end, dst, pick[1], pick[0], dst_pos)


def _mark_filled(plan: Plan, chunks: Sequence[Chunk], keys: Sequence[bytes], directory: Directory) -> None:
    """Name, on each edge-fill piece, the prompt's unstored chunks that pieces cover whole (`LoadItem.within`):
    they hold only other chunks' KV, so they are not saved as computed (and are filled again next time).  A
    chunk partly computed is saved: its computed tokens exist nowhere else."""
    items = plan.items
    if all(it.src_end - it.src_start == len(it.token_ids) for it in items):
        return  # no pieces
    within: dict[int, list[bytes]] = {}  # item index -> covered chunks
    i = 0
    for c, k in zip(chunks, keys):
        while i < len(items) and items[i].dst_end <= c.start:
            i += 1
        if k in directory or i == len(items) or items[i].dst_start > c.start:
            continue
        j, pos = i, c.start
        while j < len(items) and items[j].dst_start == pos and pos < c.end:
            pos = items[j].dst_end
            j += 1
        if pos >= c.end:
            for m in range(i, j):
                within.setdefault(m, []).append(k)
    if not within:
        return
    n = 0
    for p_i, p in enumerate(plan.placements):
        new = tuple(dataclasses.replace(it, within=tuple(within[n + m])) if n + m in within else it
                    for m, it in enumerate(p.items))
        n += len(p.items)
        plan.placements[p_i] = Placement(new)


def _sum_in(spans: deque, lo: int, total: int) -> int:
    """Tokens of `spans` (`total` in all, in order) at or after `lo`."""
    for a, b in spans:
        if b <= lo:
            total -= b - a
        elif a < lo:
            total -= lo - a
        else:
            break
    return total


def plan_saves(token_ids: Sequence[int], chunks: Sequence[Chunk], keys: Sequence[bytes], directory: Directory,
               placed: set[bytes], capture_patches: bool, positions: torch.Tensor | None = None,
               min_tokens: int = 1, approximate_from: int | None = None) -> list[SaveItem]:
    """Chunks whose KV this request computed and the store lacks (new keys, or new contexts).

    Each item carries the last `RECENT` keys before it (`recent`: the scheduler's directory records
    them, and the worker's store persists them with the context).  Text chunks under `min_tokens` are not saved
    (never worth placing); media items always are.  `approximate_from`: the request's first position
    holding approximate KV (None: none); a chunk ending after it was computed after approximate KV (or
    holds some) and is recorded under the tainted signature (`fidelity.tainted`), never as exact.
    """
    out: list[SaveItem] = []
    recent: deque[bytes] = deque(maxlen=RECENT)
    for j, (c, sig) in enumerate(zip(chunks, prefix_signatures(keys))):
        key = keys[j]
        if approximate_from is not None and c.end > approximate_from:
            sig = tainted(sig)
        if key not in placed and (c.num_tokens >= min_tokens or c.mm_ids):
            pos = as_tuple(positions[:, c.start:c.end]) if positions is not None else None
            e = directory.get(key)
            new = e is None
            if new or (capture_patches and not e.remote and sig not in e.contexts and e.num_tokens == c.num_tokens):
                out.append(SaveItem(key, tuple(token_ids[c.start:c.end]), c.start, c.end, sig, new, pos, tuple(recent),
                                    not c.mm_ids))
        recent.append(key)
    return out
