"""Memory tiers: entries kept as tensors on a device (GPU, or CPU without one) or in pinned host memory."""

from __future__ import annotations

import torch

from kvreuse.store.entry import ChunkEntry
from kvreuse.store.keys import ChunkKey
from kvreuse.store.policy import EvictionPolicy


class MemoryTier:
    """Entries as live tensors on ``device``; ``reserve`` holds bytes for an entry still being loaded."""

    def __init__(self, name: str, budget_bytes: int, device: torch.device, *, pin: bool,
                 policy: EvictionPolicy) -> None:
        assert budget_bytes >= 0
        self.name, self.budget_bytes, self.device, self.pin = name, budget_bytes, device, pin
        self.policy = policy
        self.entries: dict[ChunkKey, ChunkEntry] = {}
        self._sizes: dict[ChunkKey, int] = {}
        self.reserved: dict[ChunkKey, int] = {}
        self.used_bytes = 0

    def __contains__(self, key: ChunkKey) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self.used_bytes

    def adopt(self, entry: ChunkEntry) -> ChunkEntry:
        """The entry with its tensors on this tier's device (a copy only when they are elsewhere)."""
        if entry.k.device == self.device and (not self.pin or entry.k.is_pinned()):
            return entry
        return entry.to(self.device, pin=self.pin)

    def insert(self, entry: ChunkEntry, nbytes: int | None = None) -> None:
        """Insert an entry already on this device; the caller has made room (or reserved it).  ``nbytes``:
        ``entry.nbytes``, where the caller has it."""
        assert entry.key not in self.entries
        n = entry.nbytes if nbytes is None else nbytes
        self.used_bytes -= self.reserved.pop(entry.key, 0)
        assert self.used_bytes + n <= self.budget_bytes, (self.name, self.used_bytes, n, self.budget_bytes)
        self.entries[entry.key] = entry
        self._sizes[entry.key] = n
        self.used_bytes += n
        self.policy.update(entry.key, nbytes=n, cost=entry.recompute_cost, hits=entry.hits)

    def resized(self, key: ChunkKey) -> None:
        """Re-account an entry whose bytes changed (demotion shrinks; adding KV grows, after making room)."""
        e = self.entries[key]
        n = e.nbytes
        self.used_bytes += n - self._sizes[key]
        self._sizes[key] = n
        assert self.used_bytes <= self.budget_bytes, (self.name, self.used_bytes, self.budget_bytes)
        self.policy.update(key, nbytes=n, cost=e.recompute_cost, hits=e.hits)

    def size_of(self, key: ChunkKey) -> int:
        """Bytes ``key`` occupies here (0 if absent)."""
        return self._sizes.get(key, 0)

    def touched(self, key: ChunkKey) -> None:
        e = self.entries[key]
        self.policy.update(key, nbytes=self._sizes[key], cost=e.recompute_cost, hits=e.hits)

    def pop(self, key: ChunkKey, *, evicted: bool = False) -> ChunkEntry:
        e = self.entries.pop(key)
        self.used_bytes -= self._sizes.pop(key)
        (self.policy.evicted if evicted else self.policy.remove)(key)
        return e

    def reserve(self, key: ChunkKey, nbytes: int) -> None:
        assert key not in self.reserved and self.used_bytes + nbytes <= self.budget_bytes
        self.reserved[key] = nbytes
        self.used_bytes += nbytes

    def release(self, key: ChunkKey) -> None:
        self.used_bytes -= self.reserved.pop(key, 0)


def device_tier(budget_bytes: int, policy: EvictionPolicy, device: torch.device | str | None = None) -> MemoryTier:
    """The fastest tier: CUDA memory when there is a GPU, else plain CPU tensors."""
    dev = torch.device(device) if device is not None else torch.device(
        f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    return MemoryTier("device", budget_bytes, dev, pin=False, policy=policy)


def host_tier(budget_bytes: int, policy: EvictionPolicy) -> MemoryTier:
    """Host memory, pinned where CUDA is available so that promotion to the GPU is a DMA."""
    return MemoryTier("host", budget_bytes, torch.device("cpu"), pin=torch.cuda.is_available(), policy=policy)
