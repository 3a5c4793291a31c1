"""Store statistics as plain mergeable dataclasses (their Prometheus exposition lives in the connector).

Names are in base units (``_bytes``, ``_seconds``).  ``merge`` returns a new object and never
mutates its inputs, so per-worker stats can be summed in any order.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field, fields, replace

# Upper bounds (seconds) of the latency buckets; the last bucket is open-ended (+Inf).
LATENCY_BUCKETS_SECONDS: tuple[float, ...] = (
    1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 5e-3, 1e-2, 1.5e-2, 2e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)


@dataclass
class LatencyHistogram:
    """Fixed-bucket histogram: ``counts[i]`` observations <= ``LATENCY_BUCKETS_SECONDS[i]``, last is +Inf."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_SECONDS) + 1))
    sum_seconds: float = 0.0

    def __post_init__(self) -> None:
        if len(self.counts) != len(LATENCY_BUCKETS_SECONDS) + 1:
            raise ValueError(f"counts: expected {len(LATENCY_BUCKETS_SECONDS) + 1} buckets, got {len(self.counts)}")

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS_SECONDS, seconds)] += 1
        self.sum_seconds += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def merge(self, other: "LatencyHistogram") -> "LatencyHistogram":
        return LatencyHistogram([a + b for a, b in zip(self.counts, other.counts)], self.sum_seconds + other.sum_seconds)


@dataclass
class TierStats:
    """Counters of one tier.  ``used_bytes``/``budget_bytes`` are gauges (merge sums them across stores)."""

    hits: int = 0
    misses: int = 0
    puts: int = 0
    rejected_puts: int = 0  # entry larger than the whole budget, or the tier is unreachable
    evictions: int = 0
    evicted_bytes: int = 0
    errors: int = 0  # I/O or connection failures turned into misses
    dropped_corrupt: int = 0
    bytes_written: int = 0
    bytes_read: int = 0
    used_bytes: int = 0
    budget_bytes: int = 0
    entries: int = 0

    def merge(self, other: "TierStats") -> "TierStats":
        return TierStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})


def _merge_counts(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


@dataclass
class StoreStats:
    """Everything the store counts.

    ``hits_by_policy`` counts hits by how the KV was served ("exact", "patched", "base", or a
    label the caller passes, e.g. "survival", "reorder", "recall").
    """

    tiers: dict[str, TierStats] = field(default_factory=dict)
    hits_by_policy: dict[str, int] = field(default_factory=dict)
    lookups: int = 0
    misses: int = 0
    token_mismatches: int = 0
    demotions: int = 0
    demoted_bytes: int = 0
    rehydrations: int = 0
    shared_rehydrations: int = 0  # lookups that joined an in-flight rehydration
    failed_loads: int = 0
    load_timeouts: int = 0  # lookups that stopped waiting for a slow tier (a miss; the load itself goes on)
    bytes_moved: int = 0  # between tiers, both directions
    ingests: int = 0  # chunks accepted by ``ingest`` (queued)
    dropped_ingests: int = 0  # chunks ``ingest`` refused because its queue was full
    ingested_entries: int = 0  # new entries stored by the ingest thread
    ingested_contexts: int = 0  # in-context KV of a stored chunk kept by the ingest thread
    captured_patches: int = 0  # patches fitted for a new context at ingest
    failed_ingests: int = 0  # ingest jobs that raised (the chunk is not stored; never an engine error)
    failed_fits: int = 0  # patch fits that raised (non-finite KV): that context reads as base KV
    dropped_spills: int = 0  # evicted entries not written to disk because the background lane was full
    dropped_write_behind: int = 0  # disk copies of new entries skipped because the background lane was full
    dropped_fits: int = 0  # demoted contexts left without a patch because the background lane was full
    lookup_seconds: LatencyHistogram = field(default_factory=LatencyHistogram)
    put_seconds: LatencyHistogram = field(default_factory=LatencyHistogram)
    rehydrate_seconds: LatencyHistogram = field(default_factory=LatencyHistogram)
    ingest_seconds: LatencyHistogram = field(default_factory=LatencyHistogram)  # one ingest job, end to end

    def tier(self, name: str) -> TierStats:
        return self.tiers.setdefault(name, TierStats())

    def merge(self, other: "StoreStats") -> "StoreStats":
        out = replace(self)
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name == "tiers":
                v = {n: a.get(n, TierStats()).merge(b.get(n, TierStats())) for n in a.keys() | b.keys()}
            elif isinstance(a, dict):
                v = _merge_counts(a, b)
            elif isinstance(a, LatencyHistogram):
                v = a.merge(b)
            else:
                v = a + b
            setattr(out, f.name, v)
        return out

    def copy(self) -> "StoreStats":
        return StoreStats().merge(self)
