"""Storage tiers, fastest first: device memory, host memory, local disk, shared Redis.

Tiers hold data and enforce nothing but their own accounting; the :class:`~kvreuse.store.store.ChunkStore`
decides what goes where and makes room before every insert, so a tier's ``used_bytes`` never
exceeds its ``budget_bytes`` (asserted on every insert).
"""

from kvreuse.store.tiers.disk import DiskTier
from kvreuse.store.tiers.memory import MemoryTier, device_tier, host_tier
from kvreuse.store.tiers.redis import RedisTier

__all__ = ["DiskTier", "MemoryTier", "RedisTier", "device_tier", "host_tier"]
