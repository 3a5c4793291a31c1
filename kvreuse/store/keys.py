"""Content keys: a chunk's identity is its model, its cache salt, its tokens and its media.

Every field is length-prefixed before hashing so that no two different field tuples can
produce the same byte stream.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
import xxhash

_DIGEST_BYTES = 16


def _feed(h: "xxhash.xxh3_128", data: bytes) -> None:
    h.update(struct.pack("<Q", len(data)))
    h.update(data)


def token_bytes(token_ids: Sequence[int] | np.ndarray | torch.Tensor) -> bytes:
    """Canonical bytes of a token id sequence (int64 little-endian), whatever its container."""
    if isinstance(token_ids, torch.Tensor):
        arr = token_ids.detach().to("cpu", torch.int64).numpy()
    else:
        arr = np.asarray(token_ids, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"token_ids: expected 1-D, got shape {tuple(arr.shape)}")
    return arr.astype("<i8", copy=False).tobytes()


@dataclass(frozen=True)
class ModelFingerprint:
    """What changes a model's KV: architecture, weights, dtype and tensor-parallel placement.

    ``digest`` (16 bytes) goes into every key and every persisted header; two stores with
    different fingerprints never serve each other's entries.
    """

    architecture: str
    weights_id: str
    dtype: str
    tp_rank: int = 0
    tp_size: int = 1

    def __post_init__(self) -> None:
        if not self.architecture:
            raise ValueError("architecture: must be non-empty")
        if not self.weights_id:
            raise ValueError("weights_id: must be non-empty (checkpoint hash or weights_id_from_files)")
        if not (0 <= self.tp_rank < self.tp_size):
            raise ValueError(f"tp_rank: need 0 <= tp_rank < tp_size, got {self.tp_rank}/{self.tp_size}")

    @property
    def digest(self) -> bytes:
        h = xxhash.xxh3_128()
        for part in ("kvreuse-model-v1", self.architecture, self.weights_id, self.dtype,
                     str(self.tp_rank), str(self.tp_size)):
            _feed(h, part.encode())
        return h.digest()


def weights_id_from_files(paths: Iterable[str | os.PathLike], *, chunk_bytes: int = 1 << 24) -> str:
    """Identity of a checkpoint from its files' contents (sha256 over the sorted files' names and bytes).

    Reads every byte once; callers that have the checkpoint's own hash (e.g. a hub revision)
    should pass that instead.
    """
    h = hashlib.sha256()
    for p in sorted(map(os.fspath, paths)):
        h.update(os.path.basename(p).encode() + b"\0")
        with open(p, "rb") as f:
            while block := f.read(chunk_bytes):
                h.update(block)
    return h.hexdigest()


@dataclass(frozen=True, order=True)
class ChunkKey:
    """xxh3-128 over (model fingerprint, cache salt, token ids, multimodal content identifiers)."""

    digest: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.digest, bytes) or len(self.digest) != _DIGEST_BYTES:
            raise ValueError(f"digest: expected {_DIGEST_BYTES} bytes, got {self.digest!r}")

    @classmethod
    def of(cls, model: bytes | ModelFingerprint, token_ids: Sequence[int] | np.ndarray | torch.Tensor,
           *, cache_salt: str | bytes | None = None, mm_ids: Sequence[str | bytes] = ()) -> "ChunkKey":
        """Key of a chunk.  ``mm_ids`` are the content identifiers of the media inside the chunk, in order."""
        fp = model.digest if isinstance(model, ModelFingerprint) else model
        h = xxhash.xxh3_128()
        _feed(h, b"kvreuse-chunk-v1")
        _feed(h, fp)
        salt = cache_salt.encode() if isinstance(cache_salt, str) else cache_salt
        _feed(h, b"\0" if salt is None else b"\1" + salt)
        _feed(h, token_bytes(token_ids))
        h.update(struct.pack("<Q", len(mm_ids)))
        for m in mm_ids:
            _feed(h, m.encode() if isinstance(m, str) else m)
        return cls(h.digest())

    @classmethod
    def from_hex(cls, s: str) -> "ChunkKey":
        return cls(bytes.fromhex(s))

    def hex(self) -> str:
        return self.digest.hex()

    def __repr__(self) -> str:
        return f"ChunkKey({self.hex()})"
