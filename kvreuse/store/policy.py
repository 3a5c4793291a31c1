"""Eviction policies: which entry of a full tier goes first.

Both policies keep a priority per key in a heap (lazy deletion); the victim is the key with the
lowest priority.

:class:`CostAwarePolicy` is GreedyDual-Size-Frequency (Cherkasova 1998)::

    priority(e) = L + frequency(e) * recompute_cost(e) / bytes(e)

with ``frequency = hits + 1``, ``recompute_cost`` in seconds (an image chunk's includes its vision
encoder) and ``bytes`` what the entry occupies in this tier.  ``L`` is the tier's clock: when an
entry is evicted, ``L`` becomes its priority.  Entries therefore compete on *recompute seconds
saved per byte held*, weighted by how often they were reused; the clock ages them, since a newly
inserted or touched entry starts from the current ``L`` while idle entries keep the old, lower
value and eventually fall below it.  A demoted entry (base + patch) is smaller, so it keeps its
place longer for the same cost.

:class:`LRUPolicy` is the baseline: priority = logical time of last use.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Hashable


class EvictionPolicy:
    """Priority index over keys; subclasses define :meth:`_priority`."""

    name = "base"

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Hashable]] = []
        self._prio: dict[Hashable, tuple[float, int]] = {}
        self._seq = itertools.count()

    def _priority(self, *, nbytes: int, cost: float, hits: int) -> float:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self._prio)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._prio

    def update(self, key: Hashable, *, nbytes: int, cost: float, hits: int) -> None:
        """Insert ``key`` or refresh its priority after a hit or a size change."""
        p = (self._priority(nbytes=max(nbytes, 1), cost=cost, hits=hits), next(self._seq))
        self._prio[key] = p
        heapq.heappush(self._heap, (p[0], p[1], key))
        if len(self._heap) > 4 * len(self._prio) + 64:  # drop stale heap rows now and then
            self._heap = [(pr, s, k) for k, (pr, s) in self._prio.items()]
            heapq.heapify(self._heap)

    def remove(self, key: Hashable) -> None:
        self._prio.pop(key, None)

    def victims(self) -> list[Hashable]:
        """Keys from lowest to highest priority (a snapshot; does not evict)."""
        return [k for k, _ in sorted(self._prio.items(), key=lambda kv: kv[1])]

    def peek(self) -> Hashable | None:
        """The current victim, without removing it."""
        while self._heap:
            pr, s, k = self._heap[0]
            if self._prio.get(k) == (pr, s):
                return k
            heapq.heappop(self._heap)
        return None

    def evicted(self, key: Hashable) -> None:
        """Record that ``key`` left the tier because of pressure (ages the clock in GDSF)."""
        self.remove(key)


class LRUPolicy(EvictionPolicy):
    """Least recently used first."""

    name = "lru"

    def __init__(self) -> None:
        super().__init__()
        self._tick = itertools.count()

    def _priority(self, *, nbytes: int, cost: float, hits: int) -> float:
        return float(next(self._tick))


class CostAwarePolicy(EvictionPolicy):
    """GreedyDual-Size-Frequency: lowest ``L + (hits + 1) * cost / bytes`` goes first (see module doc)."""

    name = "cost"

    def __init__(self) -> None:
        super().__init__()
        self.clock = 0.0

    @staticmethod
    def score(clock: float, *, nbytes: int, cost: float, hits: int) -> float:
        return clock + (hits + 1) * cost / max(nbytes, 1)

    def _priority(self, *, nbytes: int, cost: float, hits: int) -> float:
        return self.score(self.clock, nbytes=nbytes, cost=cost, hits=hits)

    def evicted(self, key: Hashable) -> None:
        p = self._prio.get(key)
        if p is not None:
            self.clock = max(self.clock, p[0])
        super().evicted(key)


def make_policy(name: str) -> EvictionPolicy:
    """``"cost"`` (default, GDSF) or ``"lru"``."""
    if name == "cost":
        return CostAwarePolicy()
    if name == "lru":
        return LRUPolicy()
    raise ValueError(f"policy: expected 'cost' or 'lru', got {name!r}")
