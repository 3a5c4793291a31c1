"""Connector statistics: a plain mergeable object, and its vLLM `KVConnectorStats` carrier.

Counters are deltas since the last report (vLLM sums them per step and the Prometheus side
increments by them); tier gauges are the store's latest occupancy.  The Prometheus exposition
lives in `kvreuse.connector.prom`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats


def _add_maps(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


@dataclass
class ReuseStats:
    """What the connector did since the last report (counters) and the store's state (gauges)."""

    lookups_hit: int = 0
    lookups_miss: int = 0
    claims: dict[str, int] = field(default_factory=dict)        # policy -> chunks
    reused_tokens: int = 0
    saved_chunks: int = 0
    captured_patches: int = 0
    load_failures: int = 0
    load_timeouts: int = 0  # chunk loads that waited past `load_timeout_seconds` for a slow tier (recomputed)
    dropped_saves: int = 0  # chunks the store's ingest queue was too full to take (never waited for)
    deferred_saves: int = 0  # first-seen chunks not saved while nothing recurred (adaptive admission)
    bytes_loaded: dict[str, int] = field(default_factory=dict)  # tier -> bytes
    bytes_saved: dict[str, int] = field(default_factory=dict)
    evictions: dict[str, int] = field(default_factory=dict)
    rehydrations: dict[str, int] = field(default_factory=dict)
    demotions: int = 0
    encoder_inputs: dict[str, int] = field(default_factory=dict)   # modality -> items vLLM scheduled to encode
    mm_items_reused: dict[str, int] = field(default_factory=dict)  # modality -> items placed (encoder skipped)
    segments: dict[str, int] = field(default_factory=dict)     # "placed" / "computed" -> prompt segments
    gap_tokens: int = 0                                         # prompt tokens computed after vLLM's prefix hit
    load_seconds: list[float] = field(default_factory=list)     # one observation per request load
    save_seconds: list[float] = field(default_factory=list)
    store_bytes: dict[str, int] = field(default_factory=dict)   # gauges
    store_budget_bytes: dict[str, int] = field(default_factory=dict)
    store_entries: dict[str, int] = field(default_factory=dict)
    store_pending_bytes: dict[str, int] = field(default_factory=dict)  # background queue -> bytes not yet done

    GAUGES = ("store_bytes", "store_budget_bytes", "store_entries", "store_pending_bytes")
    # What each tensor-parallel rank's own store (or copy) does: summed over ranks, the deployment's total.
    PER_RANK = ("bytes_loaded", "bytes_saved", "evictions", "rehydrations", "demotions", "dropped_saves",
                "captured_patches", "load_timeouts")

    def merge(self, other: "ReuseStats") -> "ReuseStats":
        """Sum of counters; gauges keep the latest value per key (with tensor parallelism each rank's
        store has its own keys, ``"<tier>#<rank>"``, so no rank's value hides another's)."""
        out = ReuseStats()
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, dict):
                v = _add_maps(a, b) if f.name not in self.GAUGES else {**a, **b}
            else:
                v = a + b
            setattr(out, f.name, v)
        return out

    def for_rank(self, rank: int, size: int) -> "ReuseStats":
        """What tensor-parallel rank ``rank`` of ``size`` reports of its worker's stats (vLLM sums the ranks').

        Every rank places and saves the same chunks (its own heads), so what counts chunks, tokens or
        request timings (claims, reused tokens, saved chunks, load and save seconds) is reported by
        rank 0 alone; each rank's own events (``PER_RANK``: bytes moved, evictions, demotions,
        rehydrations, dropped saves, patches, load timeouts) by every rank, summed; gauges keyed
        ``"<tier>#<rank>"``.
        """
        if size == 1:
            return self
        gauges = {f: {f"{tier}#{rank}": x for tier, x in getattr(self, f).items()} for f in self.GAUGES}
        if rank == 0:
            return replace(self, **gauges)
        return ReuseStats(**{f: getattr(self, f) for f in self.PER_RANK}, **gauges)

    def counters_empty(self) -> bool:
        """Nothing happened since the last report (gauges aside): checked every step, so without copies."""
        return not any(getattr(self, n) for n in _COUNTERS)

    def is_empty(self) -> bool:
        return self.counters_empty() and not any(getattr(self, n) for n in self.GAUGES)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "ReuseStats":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in names})


class KVReuseConnectorStats(KVConnectorStats):
    """vLLM's carrier: `data` is `ReuseStats.to_dict()` (serializable across processes)."""

    def reset(self) -> None:
        self.data = ReuseStats().to_dict()

    def aggregate(self, other: KVConnectorStats) -> "KVReuseConnectorStats":
        merged = ReuseStats.from_dict(self.data).merge(ReuseStats.from_dict(other.data))
        return KVReuseConnectorStats(data=merged.to_dict())

    def reduce(self) -> dict[str, int | float]:
        s = ReuseStats.from_dict(self.data)
        n = len(s.load_seconds)
        return {"chunk_hits": s.lookups_hit, "chunk_misses": s.lookups_miss, "reused_tokens": s.reused_tokens,
                "load_failures": s.load_failures, "avg_load_ms": round(1e3 * sum(s.load_seconds) / n, 3) if n else 0.0}

    def is_empty(self) -> bool:
        return ReuseStats.from_dict(self.data).is_empty()


_COUNTERS = tuple(f.name for f in fields(ReuseStats) if f.name not in ReuseStats.GAUGES)
