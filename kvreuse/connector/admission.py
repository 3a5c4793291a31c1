"""Admission of first-seen chunks: when nothing recurs, save only what has been seen before.

Saving a chunk costs a copy out of the paged cache and a store insert on every prompt, whether
or not the chunk ever comes back.  On traffic where nothing recurs that work buys nothing, and on
a small host it slows the steps it overlaps.  `Recurrence` watches whether content recurs:

* it remembers the keys of recent prompts' chunks (a bounded first-in first-out set of the first
  8 bytes of each key, `capacity` keys; a doorkeeper in the sense of TinyLFU);
* for each new request it notes which of its chunks were seen in an earlier prompt (or are stored),
  and the share of its tokens after vLLM's own prefix hit that recur;
* over the last `window` requests, when that share is under `min_share`, the scheduler is
  *cold*: a chunk whose key is new is saved only if it was seen before (its second occurrence),
  so a chunk first seen then is placed from its third occurrence on.  As soon as recurrence is
  back above `min_share`, every new chunk is saved again.

At `policy.fidelity` "exact" a chunk can be placed only after the very chunks it followed when
it was saved, so there what recurs is a chunk *in its context*: the scheduler observes
`in_context_id` (each key hashed with every key before it) instead of the keys, and while cold
defers a chunk's save in a context not seen before whether or not its key is stored (a sliding
window, whose chunks recur under an ever new first chunk, then saves nothing it could not place).

Until `window` requests have been seen the scheduler is not cold (a fresh server saves
everything).  Tokens vLLM's prefix cache serves are left out of the share: a common system prompt
recurring in every request says nothing about whether the rest will.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Sequence

import xxhash

from kvreuse.connector.segment import Chunk


def in_context_id(sig: bytes, key: bytes) -> bytes:
    """Chunk `key`'s identity together with every chunk before it (`sig`: their `claim.prefix_signatures`):
    equal only where a prompt repeats the whole prefix up to and including the chunk (what an exact
    placement needs)."""
    return xxhash.xxh3_64_digest(sig + key)


class Recurrence:
    def __init__(self, window: int = 8, min_share: float = 0.02, capacity: int = 1 << 17) -> None:
        self.window, self.min_share, self.capacity = window, min_share, capacity
        self._order: deque[int] = deque()   # keys in the order seen (a key may appear more than once)
        self._count: dict[int, int] = {}    # key -> occurrences in `_order`
        self._shares: deque[tuple[int, int]] = deque(maxlen=max(window, 1))  # (recurring, counted) tokens
        self._rec = self._tot = 0           # sums over `_shares`

    @staticmethod
    def _id(key: bytes) -> int:
        return int.from_bytes(key[:8], "little")

    def observe(self, chunks: Sequence[Chunk], keys: Sequence[bytes], skip_tokens: int = 0,
                stored: Callable[[bytes], bool] | None = None) -> list[bool]:
        """A new request's chunks: which were seen in an earlier prompt (or are `stored`).  Counts the share
        of its tokens from `skip_tokens` on (vLLM's prefix hit) that recur, then remembers its keys."""
        seen, rec, tot = [], 0, 0
        for c, k in zip(chunks, keys):
            s = self._id(k) in self._count or (stored is not None and stored(k))
            seen.append(s)
            n = c.end - max(c.start, skip_tokens)
            if n > 0:
                tot += n
                rec += n if s else 0
        if tot:
            if len(self._shares) == self._shares.maxlen:
                r0, t0 = self._shares[0]
                self._rec, self._tot = self._rec - r0, self._tot - t0
            self._shares.append((rec, tot))
            self._rec, self._tot = self._rec + rec, self._tot + tot
        for k in keys:
            i = self._id(k)
            self._order.append(i)
            self._count[i] = self._count.get(i, 0) + 1
        while len(self._order) > self.capacity:
            i = self._order.popleft()
            left = self._count[i] - 1
            if left:
                self._count[i] = left
            else:
                del self._count[i]
        return seen

    @property
    def share(self) -> float | None:
        """Share of recently counted tokens that recurred (None before any was counted)."""
        return self._rec / self._tot if self._tot else None

    @property
    def cold(self) -> bool:
        """The last `window` requests recurred less than `min_share`: save only chunks seen before."""
        return (self.window > 0 and len(self._shares) == self._shares.maxlen
                and self._rec < self.min_share * self._tot)
