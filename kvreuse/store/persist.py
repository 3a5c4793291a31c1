"""On-disk / in-Redis entry format: a msgpack header followed by raw tensor bytes.

Layout::

    prefix   : magic b"KVRCHNK1" | u32 header_len | u64 xxh3_64(header)      (20 bytes, little-endian)
    header   : msgpack map (format version, key, model fingerprint, shapes, dtype, token ids,
               positions, contexts and their preceding chunk keys, patch ranks, segment table,
               payload checksum)
    payload  : segments back to back: k.0, v.0, k.1, v.1, ... (one layer's base K and V each,
               so a reader can verify and hand out layer i before layer i+1 arrives), then
               in-context KV ("ctx.J.k", "ctx.J.v", and "ctx.J.pos" where it has its own frame) and patch tensors ("patch.J.NAME").

Every segment carries its own xxh3_64 and the header carries xxh3_64 of the whole payload.
Tensors are stored as their raw bytes (bf16 through a uint8 view), so round trips are bit-exact.

An :class:`IndexRecord` is what a directory of stored chunks needs of an entry (key, token count,
context signatures and, where recorded, each context's preceding chunk keys); it is read from the
header alone, so indexing a store never touches a payload.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import msgpack
import numpy as np
import torch
import xxhash

from kvreuse.store.entry import ChunkEntry
from kvreuse.store.keys import ChunkKey

FORMAT_VERSION = 1
MAGIC = b"KVRCHNK1"
_PREFIX = struct.Struct("<8sIQ")
PREFIX_BYTES = _PREFIX.size
MAX_HEADER_BYTES = 64 << 20
# Preceding chunk keys persisted per context: the last ones, in order (a context's signature covers all).
MAX_PRECEDING = 64


class EntryCorrupt(Exception):
    """A persisted entry failed its magic, header, checksum or identity check; it must not be served."""


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def dtype_named(name: str) -> torch.dtype:
    """The torch dtype a header names (``"bfloat16"``); :class:`EntryCorrupt` for an unknown name."""
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise EntryCorrupt(f"unknown dtype {name!r}")
    return dt


def _raw(t: torch.Tensor) -> np.ndarray:
    """Raw bytes of a tensor as a uint8 array (copies only if t is not a contiguous CPU tensor)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


@dataclass(frozen=True)
class Segment:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # from the start of the payload
    nbytes: int
    checksum: int


@dataclass(frozen=True)
class EntryHeader:
    """A decoded, verified header; ``payload_offset`` is where the payload starts in the blob."""

    key: ChunkKey
    model: bytes
    dtype: str
    shape: tuple[int, int, int, int]  # [num_layers, num_tokens, num_kv_heads, head_dim]
    token_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] or [3, num_tokens] int64
    context: bytes
    recompute_cost: float
    hits: int
    contexts: tuple[bytes, ...]  # in-context KV signatures, index J of "ctx.J.*"
    patch_contexts: tuple[bytes, ...]  # index J of "patch.J.*"
    patch_ranks: tuple[Any, ...]
    segment_rows: tuple[tuple, ...]  # (name, dtype, shape, offset, nbytes, checksum); see ``segments``
    payload_offset: int
    payload_bytes: int
    checksum: int
    preceding: dict[bytes, tuple[bytes, ...]]  # context signature -> ordered preceding chunk key digests

    @property
    def total_bytes(self) -> int:
        return self.payload_offset + self.payload_bytes

    @property
    def num_layers(self) -> int:
        return self.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.shape[1]

    @functools.cached_property
    def segments(self) -> dict[str, Segment]:
        """The segment table by name, in payload order.  Raises EntryCorrupt unless it tiles the payload."""
        try:
            segs = {s[0]: Segment(s[0], s[1], tuple(s[2]), int(s[3]), int(s[4]), int(s[5]))
                    for s in self.segment_rows if len(s) == 6}
        except Exception as e:
            raise EntryCorrupt(f"malformed segment table: {type(e).__name__}: {e}") from None
        end = 0
        for seg in segs.values():
            if seg.offset != end or seg.nbytes < 0:
                raise EntryCorrupt("segment table is not contiguous")
            end += seg.nbytes
        if end != self.payload_bytes or len(segs) != len(self.segment_rows):
            raise EntryCorrupt("segment table does not cover the payload")
        return segs

    def record(self) -> "IndexRecord":
        """What a directory of stored chunks needs of this entry."""
        sigs = tuple(dict.fromkeys((self.context, *self.contexts, *self.patch_contexts)))
        return IndexRecord(self.key.digest, self.num_tokens, sigs,
                           {s: p for s, p in self.preceding.items() if s in sigs})


@dataclass(frozen=True)
class IndexRecord:
    """A stored chunk as a directory sees it: no KV, only what claims are planned from.

    ``contexts``: signatures of the contexts the entry can serve (its base context first, then
    in-context KV, then patches); ``preceding``: for those recorded with it, the ordered digests
    of the last (at most MAX_PRECEDING) chunk keys that preceded the chunk.
    """

    key: bytes
    num_tokens: int
    contexts: tuple[bytes, ...]
    preceding: dict[bytes, tuple[bytes, ...]]

    def pack(self) -> bytes:
        return msgpack.packb([self.key, self.num_tokens, list(self.contexts),
                              [[s, list(p)] for s, p in self.preceding.items()]], use_bin_type=True)

    @classmethod
    def unpack(cls, b: bytes) -> "IndexRecord":
        key, n, sigs, pre = msgpack.unpackb(b, raw=False)
        return cls(bytes(key), int(n), tuple(bytes(x) for x in sigs), {bytes(s): tuple(p) for s, p in pre})


def _patch_ranks(p: Any) -> Any:
    r = getattr(p, "ranks", None)
    if callable(r):
        r = r()
    if isinstance(r, torch.Tensor):
        return r.tolist()
    if isinstance(r, (list, tuple)):
        return [x.tolist() if isinstance(x, torch.Tensor) else x for x in r]
    return r if isinstance(r, (int, type(None))) else None


def plan(entry: ChunkEntry, model: bytes) -> tuple[bytes, list[np.ndarray]]:
    """Serialise ``entry``: returns (prefix + header bytes, payload segment buffers in order)."""
    tensors: list[tuple[str, torch.Tensor]] = []
    for i in range(entry.num_layers):
        tensors += [(f"k.{i}", entry.k[i]), (f"v.{i}", entry.v[i])]
    contexts = list(entry.in_context)
    for j, c in enumerate(contexts):
        ck, cv = entry.in_context[c]
        tensors += [(f"ctx.{j}.k", ck), (f"ctx.{j}.v", cv)]
        if c in entry.frames:  # computed at other positions than the base: its own frame
            tensors.append((f"ctx.{j}.pos", entry.frames[c]))
    patch_contexts = list(entry.patches)
    for j, c in enumerate(patch_contexts):
        for name, t in entry.patches[c].state_dict().items():
            tensors.append((f"patch.{j}.{name}", t))
    bufs, segs, off, total = [], [], 0, xxhash.xxh3_64()
    for name, t in tensors:
        b = _raw(t)
        total.update(b)
        segs.append([name, _dtype_name(t.dtype), list(t.shape), off, b.nbytes, xxhash.xxh3_64_intdigest(b)])
        bufs.append(b)
        off += b.nbytes
    header = {
        "format": FORMAT_VERSION, "key": entry.key.digest, "model": model,
        "dtype": _dtype_name(entry.dtype), "shape": list(entry.k.shape),
        "token_ids": _raw(entry.token_ids).tobytes(),
        "positions": _raw(entry.positions).tobytes(), "positions_shape": list(entry.positions.shape),
        "context": entry.context, "recompute_cost": float(entry.recompute_cost), "hits": int(entry.hits),
        "contexts": contexts, "patch_contexts": patch_contexts,
        "patch_ranks": [_patch_ranks(entry.patches[c]) for c in patch_contexts],
        "segments": segs, "payload_bytes": off, "checksum": total.intdigest(),
        "preceding": [[c, list(p[-MAX_PRECEDING:])] for c, p in entry.preceding.items()
                      if c == entry.context or c in entry.in_context or c in entry.patches],
    }
    hb = msgpack.packb(header, use_bin_type=True)
    return _PREFIX.pack(MAGIC, len(hb), xxhash.xxh3_64_intdigest(hb)) + hb, bufs


def encode(entry: ChunkEntry, model: bytes) -> bytes:
    """The whole serialised entry as one bytes object (for Redis)."""
    head, bufs = plan(entry, model)
    return b"".join([head, *(memoryview(b) for b in bufs)])


def header_length(prefix: bytes) -> int:
    """Length of the msgpack header given the first PREFIX_BYTES bytes of a blob."""
    if len(prefix) < PREFIX_BYTES:
        raise EntryCorrupt("truncated prefix")
    magic, n, _ = _PREFIX.unpack_from(prefix)
    if magic != MAGIC:
        raise EntryCorrupt("bad magic")
    if n > MAX_HEADER_BYTES:
        raise EntryCorrupt(f"header length {n} too large")
    return n


def decode_header(head: bytes, *, model: bytes, key: ChunkKey | None = None) -> EntryHeader:
    """Parse and verify prefix + header.  Raises EntryCorrupt on any mismatch (including another model)."""
    n = header_length(head)
    _, _, hsum = _PREFIX.unpack_from(head)
    hb = bytes(head[PREFIX_BYTES:PREFIX_BYTES + n])
    if len(hb) != n or xxhash.xxh3_64_intdigest(hb) != hsum:
        raise EntryCorrupt("header checksum mismatch")
    try:
        h = msgpack.unpackb(hb, raw=False, use_list=False)
        if h["format"] != FORMAT_VERSION:
            raise EntryCorrupt(f"format {h['format']} != {FORMAT_VERSION}")
        if h["model"] != model:
            raise EntryCorrupt("entry belongs to another model fingerprint")
        hk = ChunkKey(h["key"])
        if key is not None and hk != key:
            raise EntryCorrupt("entry key does not match its name")
        shape = tuple(int(x) for x in h["shape"])
        tok = torch.from_numpy(np.frombuffer(h["token_ids"], dtype="<i8").copy())
        pos = torch.from_numpy(np.frombuffer(h["positions"], dtype="<i8").copy()).reshape(h["positions_shape"])
        rows = h["segments"]  # checked and turned into Segments on first use: indexing never needs them
        if not isinstance(rows, tuple):
            raise EntryCorrupt("segment table is malformed")
        return EntryHeader(
            key=hk, model=h["model"], dtype=h["dtype"], shape=shape, token_ids=tok, positions=pos,
            context=h["context"], recompute_cost=float(h["recompute_cost"]), hits=int(h["hits"]),
            contexts=tuple(h["contexts"]), patch_contexts=tuple(h["patch_contexts"]),
            patch_ranks=tuple(h["patch_ranks"]), segment_rows=rows, payload_offset=PREFIX_BYTES + n,
            payload_bytes=int(h["payload_bytes"]), checksum=int(h["checksum"]),
            preceding={bytes(c): tuple(bytes(d) for d in p) for c, p in h.get("preceding", ())})
    except EntryCorrupt:
        raise
    except Exception as e:  # malformed msgpack or fields: never served
        raise EntryCorrupt(f"malformed header: {type(e).__name__}: {e}") from None


def segment_tensor(h: EntryHeader, seg: Segment, raw: Any, *, device: torch.device | str = "cpu",
                   pin: bool = False) -> torch.Tensor:
    """Verify one segment's bytes (a buffer of exactly seg.nbytes) and return it as a tensor on ``device``."""
    arr = np.frombuffer(raw, dtype=np.uint8)
    if arr.nbytes != seg.nbytes:
        raise EntryCorrupt(f"segment {seg.name}: truncated ({arr.nbytes} of {seg.nbytes} bytes)")
    if xxhash.xxh3_64_intdigest(arr) != seg.checksum:
        raise EntryCorrupt(f"segment {seg.name}: checksum mismatch")
    u8 = torch.empty(seg.nbytes, dtype=torch.uint8, pin_memory=pin and torch.cuda.is_available())
    u8.numpy()[:] = arr
    t = u8.view(dtype_named(seg.dtype)).reshape(seg.shape)
    return t if torch.device(device).type == "cpu" else t.to(device, non_blocking=pin)


def verify_payload(h: EntryHeader, chunks: Iterator[Any]) -> None:
    """Check the whole-payload checksum over the payload streamed as buffers."""
    total, n = xxhash.xxh3_64(), 0
    for c in chunks:
        total.update(c)
        n += memoryview(c).nbytes
    if n != h.payload_bytes or total.intdigest() != h.checksum:
        raise EntryCorrupt("payload checksum mismatch or truncated payload")


def assemble(h: EntryHeader, tensors: dict[str, torch.Tensor],
             patch_from_state_dict: Callable[[dict[str, torch.Tensor]], Any] | None,
             k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> ChunkEntry:
    """Build an entry from a verified header and its decoded segment tensors (or base ``k``, ``v`` given whole)."""
    L = h.num_layers
    if k is None or v is None:
        empty = torch.empty(h.shape, dtype=dtype_named(h.dtype))
        k = torch.stack([tensors[f"k.{i}"] for i in range(L)]) if L else empty
        v = torch.stack([tensors[f"v.{i}"] for i in range(L)]) if L else empty
    in_ctx = {c: (tensors[f"ctx.{j}.k"], tensors[f"ctx.{j}.v"]) for j, c in enumerate(h.contexts)}
    frames = {c: tensors[f"ctx.{j}.pos"].cpu() for j, c in enumerate(h.contexts) if f"ctx.{j}.pos" in tensors}
    patches = {}
    for j, c in enumerate(h.patch_contexts):
        pre = f"patch.{j}."
        sd = {n[len(pre):]: t for n, t in tensors.items() if n.startswith(pre)}
        if patch_from_state_dict is None:
            continue  # no patch class available: the base still serves
        patches[c] = patch_from_state_dict(sd)
    return ChunkEntry(key=h.key, token_ids=h.token_ids, positions=h.positions, k=k, v=v, context=h.context,
                      in_context=in_ctx, frames=frames, patches=patches, recompute_cost=h.recompute_cost, hits=h.hits,
                      preceding=dict(h.preceding))


def decode(blob: Any, *, model: bytes, key: ChunkKey | None = None,
           patch_from_state_dict: Callable[[dict[str, torch.Tensor]], Any] | None = None) -> ChunkEntry:
    """Decode and fully verify a serialised entry held in memory.  Raises EntryCorrupt."""
    mv = memoryview(blob)
    if len(mv) < PREFIX_BYTES:
        raise EntryCorrupt("truncated prefix")
    h = decode_header(mv[:PREFIX_BYTES + header_length(mv[:PREFIX_BYTES])], model=model, key=key)
    if len(mv) != h.total_bytes:
        raise EntryCorrupt(f"blob is {len(mv)} bytes, header says {h.total_bytes}")
    p = h.payload_offset
    verify_payload(h, iter([mv[p:]]))
    tensors = {s.name: segment_tensor(h, s, mv[p + s.offset:p + s.offset + s.nbytes]) for s in h.segments.values()}
    return assemble(h, tensors, patch_from_state_dict)
