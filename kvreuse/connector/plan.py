"""Segment planning, free of vLLM: which stored chunks of a prompt are placed, which are computed.

A prompt after vLLM's own prefix hit becomes alternating segments: *placed* (KV written from the
store) and *computed* (prefilled in place, attending to everything before it).  Every stored
chunk anywhere in the prompt is a candidate; the cost model (`kvreuse.connector.costs`) drops a
placement that would not pay for itself (a tiny chunk, or one whose extra scheduler step costs
more than the prefill it saves).  The last prompt token is always computed (vLLM samples from
it).  A chunk that straddles the prefix hit is placed from its first uncomputed token.

Without the segmented scheduler (`gaps=False`) only the placement that starts right at the
prefix hit can be used (vLLM's connector API claims a prefix): the first chunk that is not
placed ends the claim.  Planning is linear in the number of chunks.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import torch

from kvreuse.connector.claim import (LOOKBACK, MATCH, RECENT, Directory, GapText, LoadItem, SaveItem, choose_policy,
                                     prefix_signatures)
from kvreuse.connector.costs import CostModel
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


@dataclass
class Plan:
    """The placements of one prompt after `num_computed` prefix-cached tokens."""

    num_computed: int
    placements: list[Placement] = field(default_factory=list)
    hits: int = 0      # chunks placed
    misses: int = 0    # chunks computed (not stored, refused by policy, or not worth placing)

    @property
    def num_tokens(self) -> int:
        """What a prefix claim offers vLLM: the leading placement's tokens."""
        return self.leading

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


def plan_segments(token_ids: Sequence[int], chunks: Sequence[Chunk], keys: Sequence[bytes], directory: Directory,
                  num_computed: int, mode: str = "any", positions: torch.Tensor | None = None,
                  cost: CostModel | None = None, gaps: bool = True, anchors: Anchors | None = None) -> Plan:
    """Placements of the stored chunks of a prompt (pure: nothing is recorded).

    `positions`: the request's `[3, N]` M-RoPE positions (`kvreuse.connector.mrope`); each item
    then carries its destination positions.  Placements end on chunk boundaries and a media item
    is one chunk, so a placement never ends inside an image or video span.  `anchors`: the
    prompt's content anchors (`segment.segment_prompt`); with them, a chunk after gaps is survival
    or reorder only where a recorded context held the gaps' text (None: gaps are not checked).
    """
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

    for j, (c, sig) in enumerate(zip(chunks, prefix_signatures(keys))):
        e = directory.get(keys[j])
        ok = e is not None and e.num_tokens == c.num_tokens
        if c.end > num_computed and c.end <= limit and open_run:
            pick = None
            if ok:
                if sig in e.contexts:
                    pick = ("exact", sig)
                else:  # the looser matches depend on the key, its stored neighbours and the gaps among them
                    lo = max(spans[0][0] if len(spans) == MATCH else 0, c.start - LOOKBACK)
                    gap = anchors is not None and c.start - lo > _sum_in(spans, lo, stored_tokens)
                    memo_key = (keys[j], tuple(stored), (lo, c.start) if gap else None)
                    pick = memo[memo_key] if memo_key in memo else memo.setdefault(
                        memo_key, choose_policy(e, sig, stored, mode, GapText(anchors, lo, c.start, seen) if gap
                                                else None))
            if pick is None:
                close()
                plan.misses += 1
                open_run = gaps
            else:
                start = max(c.start, num_computed)
                if run and run[-1].dst_end != start:
                    close()
                dst_pos = as_tuple(positions[:, start:c.end]) if positions is not None else None
                run.append(LoadItem(keys[j], tuple(token_ids[c.start:c.end]), start - c.start, c.num_tokens, start,
                                    pick[1], pick[0], dst_pos))
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
    return plan


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


def plan_claim(token_ids: Sequence[int], chunks: Sequence[Chunk], keys: Sequence[bytes], directory: Directory,
               num_computed: int, mode: str = "any", positions: torch.Tensor | None = None) -> Plan:
    """The prefix claim of vLLM's stock scheduler: the placement at the prefix hit only (`plan.items`)."""
    return plan_segments(token_ids, chunks, keys, directory, num_computed, mode, positions, gaps=False)


def plan_saves(token_ids: Sequence[int], chunks: Sequence[Chunk], keys: Sequence[bytes], directory: Directory,
               placed: set[bytes], capture_patches: bool, positions: torch.Tensor | None = None,
               min_tokens: int = 1) -> list[SaveItem]:
    """Chunks whose KV this request computed and the store lacks (new keys, or new contexts).

    Each item carries the last `RECENT` keys before it (`recent`: the scheduler's directory records
    them, and the worker's store persists them with the context).  Text chunks under `min_tokens` are not saved
    (never worth placing); media items always are.
    """
    out: list[SaveItem] = []
    recent: deque[bytes] = deque(maxlen=RECENT)
    for j, (c, sig) in enumerate(zip(chunks, prefix_signatures(keys))):
        key = keys[j]
        if key not in placed and (c.num_tokens >= min_tokens or c.mm_ids):
            pos = as_tuple(positions[:, c.start:c.end]) if positions is not None else None
            e = directory.get(key)
            new = e is None
            if new or (capture_patches and not e.remote and sig not in e.contexts and e.num_tokens == c.num_tokens):
                out.append(SaveItem(key, tuple(token_ids[c.start:c.end]), c.start, c.end, sig, new, pos, tuple(recent)))
        recent.append(key)
    return out
