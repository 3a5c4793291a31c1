"""Chunk store: content-addressed chunk KV in device / host / disk / Redis tiers under byte budgets.

Testable without vLLM; the connector calls :class:`ChunkStore` (see its docstring for placement,
pressure and lookup rules).
"""

from kvreuse.store.config import StoreConfig, StoreConfigError, parse_size
from kvreuse.store.entry import ISOLATED, ChunkEntry, ChunkView
from kvreuse.store.keys import ChunkKey, ModelFingerprint, weights_id_from_files
from kvreuse.store.persist import EntryCorrupt, IndexRecord
from kvreuse.store.policy import CostAwarePolicy, LRUPolicy, make_policy
from kvreuse.store.rehydrate import ChunkLoadError, Rehydration
from kvreuse.store.stats import LatencyHistogram, StoreStats, TierStats
from kvreuse.store.store import ChunkStore, StoreEvents
from kvreuse.store.tiers.disk import scan_index

__all__ = ["ISOLATED", "ChunkEntry", "ChunkKey", "ChunkLoadError", "ChunkStore", "ChunkView", "CostAwarePolicy",
           "EntryCorrupt", "IndexRecord", "LRUPolicy", "LatencyHistogram", "ModelFingerprint", "Rehydration", "StoreConfig",
           "StoreConfigError", "StoreEvents", "StoreStats", "TierStats", "make_policy", "parse_size", "scan_index",
           "weights_id_from_files"]
