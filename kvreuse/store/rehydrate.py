"""Layer-by-layer loading of an entry from a lower tier, shared by every lookup of the same key."""

from __future__ import annotations

import threading
from typing import Any, Callable, Protocol

import numpy as np
import torch
import xxhash

from kvreuse.errors import KVReuseError
from kvreuse.store.entry import ChunkEntry
from kvreuse.store.persist import EntryCorrupt, EntryHeader, Segment, _dtype, assemble, segment_tensor


class ChunkLoadError(KVReuseError):
    """A hit could not be loaded (corrupt, evicted meanwhile, or unreachable); report it and recompute."""


class BlobReader(Protocol):
    header: EntryHeader

    def read(self, offset: int, n: int) -> bytes: ...

    def close(self) -> None: ...


class Rehydration:
    """Handle on an entry being loaded; ``layer(i)`` blocks only until layer i has arrived.

    ``token_ids`` and ``positions`` are known at once (from the header).  A failed load raises
    :class:`ChunkLoadError` from ``layer`` and ``result``; the store has already dropped the bad copy.
    """

    def __init__(self, key: Any, source: str, num_layers: int, token_ids: torch.Tensor,
                 positions: torch.Tensor) -> None:
        self.key, self.source, self.num_layers = key, source, num_layers
        self.token_ids, self.positions = token_ids, positions
        self._cv = threading.Condition()
        self._layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self._entry: ChunkEntry | None = None
        self._error: BaseException | None = None

    @classmethod
    def completed(cls, entry: ChunkEntry, source: str) -> "Rehydration":
        h = cls(entry.key, source, entry.num_layers, entry.token_ids, entry.positions)
        h._entry = entry
        return h

    def done(self) -> bool:
        return self._entry is not None or self._error is not None

    def _wait(self, pred: Callable[[], bool], timeout: float | None) -> None:
        with self._cv:
            if not self._cv.wait_for(lambda: pred() or self._error is not None, timeout):
                raise TimeoutError(f"{self.key}: still loading from {self.source}")
            if self._error is not None:
                raise ChunkLoadError(f"{self.key}: load from {self.source} failed: {self._error}") from self._error

    def layer(self, i: int, timeout: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Base K and V of layer ``i``: each ``[num_tokens, num_kv_heads, head_dim]``."""
        if not 0 <= i < self.num_layers:
            raise IndexError(f"layer {i} of {self.num_layers}")
        if self._entry is not None:
            return self._entry.k[i], self._entry.v[i]
        self._wait(lambda: self._entry is not None or self._layers[i] is not None, timeout)
        if self._entry is not None:
            return self._entry.k[i], self._entry.v[i]
        kv = self._layers[i]
        assert kv is not None
        return kv

    def result(self, timeout: float | None = None) -> ChunkEntry:
        """The whole entry once loaded."""
        self._wait(lambda: self._entry is not None, timeout)
        assert self._entry is not None
        return self._entry

    def _set_layer(self, i: int, k: torch.Tensor, v: torch.Tensor) -> None:
        with self._cv:
            self._layers[i] = (k, v)
            self._cv.notify_all()

    def _finish(self, entry: ChunkEntry | None, error: BaseException | None = None) -> None:
        with self._cv:
            self._entry, self._error = entry, error
            self._layers = [None] * self.num_layers
            self._cv.notify_all()


def _read_into(reader: BlobReader, seg: Segment, dst: torch.Tensor) -> None:
    """Read one segment, verify its checksum, copy its bytes into ``dst`` (contiguous, same dtype/shape)."""
    if tuple(dst.shape) != seg.shape or dst.dtype != _dtype(seg.dtype):
        raise EntryCorrupt(f"segment {seg.name}: shape/dtype disagree with the header")
    offset = reader.header.payload_offset + seg.offset
    u8 = dst.reshape(-1).view(torch.uint8)
    direct = getattr(reader, "read_into", None)
    if direct is not None and dst.device.type == "cpu":
        out = u8.numpy()
        direct(offset, memoryview(out))  # straight into the destination; verified in place before use
        if xxhash.xxh3_64_intdigest(out) != seg.checksum:
            raise EntryCorrupt(f"segment {seg.name}: checksum mismatch")
        return
    arr = np.frombuffer(reader.read(offset, seg.nbytes), dtype=np.uint8)
    if xxhash.xxh3_64_intdigest(arr) != seg.checksum:
        raise EntryCorrupt(f"segment {seg.name}: checksum mismatch")
    if dst.device.type == "cpu":
        u8.numpy()[:] = arr
    else:
        u8.copy_(torch.from_numpy(arr.copy()), non_blocking=False)


def load_layers(handle: Rehydration, reader: BlobReader, *, device: torch.device, pin: bool,
                patch_from_state_dict: Callable[[dict[str, torch.Tensor]], Any] | None) -> ChunkEntry:
    """Load base K/V layer by layer into preallocated tensors (publishing each layer), then the rest."""
    h = reader.header
    dt = _dtype(h.dtype)
    pin = pin and torch.cuda.is_available() and device.type == "cpu"
    k = torch.empty(h.shape, dtype=dt, device=device, pin_memory=pin)
    v = torch.empty(h.shape, dtype=dt, device=device, pin_memory=pin)
    for i in range(h.num_layers):
        _read_into(reader, h.segments[f"k.{i}"], k[i])
        _read_into(reader, h.segments[f"v.{i}"], v[i])
        handle._set_layer(i, k[i], v[i])
    rest = {}
    for name, seg in h.segments.items():
        if name.startswith(("ctx.", "patch.")):
            raw = reader.read(h.payload_offset + seg.offset, seg.nbytes)
            t = segment_tensor(h, seg, raw, pin=pin)
            rest[name] = t.to(device) if name.startswith("ctx.") else t
    return assemble(h, rest, patch_from_state_dict, k=k, v=v)
