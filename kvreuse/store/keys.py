"""Content keys: a chunk's identity is its model, its cache salt, its LoRA adapter, its tokens and its media.

Every field is length-prefixed before hashing so that no two different field tuples can
produce the same byte stream.
"""

from __future__ import annotations

import dataclasses
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
    """What changes a model's KV: architecture, weights, dtypes, quantization and parallel placement.

    ``digest`` (16 bytes) goes into every key and every persisted header; two stores with
    different fingerprints never serve each other's entries.  Each tensor-parallel rank holds
    other KV heads and each pipeline-parallel rank other layers, so ranks are part of it too.
    """

    architecture: str
    weights_id: str
    dtype: str
    tp_rank: int = 0
    tp_size: int = 1
    kv_cache_dtype: str = "auto"
    quantization: str = "none"
    pp_rank: int = 0
    pp_size: int = 1

    def __post_init__(self) -> None:
        if not self.architecture:
            raise ValueError("architecture: must be non-empty")
        if not self.weights_id:
            raise ValueError("weights_id: must be non-empty (checkpoint_identity or weights_id_from_files)")
        if not (0 <= self.tp_rank < self.tp_size):
            raise ValueError(f"tp_rank: need 0 <= tp_rank < tp_size, got {self.tp_rank}/{self.tp_size}")
        if not (0 <= self.pp_rank < self.pp_size):
            raise ValueError(f"pp_rank: need 0 <= pp_rank < pp_size, got {self.pp_rank}/{self.pp_size}")

    @property
    def digest(self) -> bytes:
        h = xxhash.xxh3_128()
        for part in ("kvreuse-model-v2", self.architecture, self.weights_id, self.dtype, str(self.tp_rank),
                     str(self.tp_size), self.kv_cache_dtype, self.quantization, str(self.pp_rank), str(self.pp_size)):
            _feed(h, part.encode())
        return h.digest()

    def for_rank(self, tp_rank: int, pp_rank: int = 0) -> "ModelFingerprint":
        """The same model as seen by another tensor/pipeline-parallel rank."""
        return dataclasses.replace(self, tp_rank=tp_rank, pp_rank=pp_rank)

    def all_ranks(self) -> list["ModelFingerprint"]:
        """Every rank's fingerprint (an entry is usable by the engine only when every rank holds it)."""
        return [self.for_rank(t, p) for p in range(self.pp_size) for t in range(self.tp_size)]


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")
_SAMPLES, _SAMPLE_BYTES = 8, 4096
_MAX_SAFETENSORS_HEADER = 100 << 20
_HEX = frozenset("0123456789abcdef")


def _file_identity(h: "hashlib._Hash", path: str) -> None:
    """Feed a weight file's name, size, safetensors header and a few sampled blocks into ``h``.

    A safetensors header (u64 length + JSON) names every tensor with its dtype, shape and offsets;
    a checkpoint fine-tuned in place keeps all of those, so a few evenly spaced 4 KiB blocks of
    the tensor bytes are hashed too.  About 40 KiB read per file, whatever its size.
    """
    size = os.path.getsize(path)
    h.update(os.path.basename(path).encode() + b"\0" + struct.pack("<Q", size))
    with open(path, "rb") as f:
        data_start = 0
        if path.endswith(".safetensors") and size >= 8:
            (n,) = struct.unpack("<Q", f.read(8))
            if n <= min(_MAX_SAFETENSORS_HEADER, size - 8):
                h.update(f.read(n))
                data_start = 8 + n
        span = size - data_start
        for i in range(_SAMPLES if span > 0 else 0):
            f.seek(data_start + (span - min(span, _SAMPLE_BYTES)) * i // max(_SAMPLES - 1, 1))
            h.update(f.read(_SAMPLE_BYTES))


def file_stamp(path: str | os.PathLike) -> bytes:
    """Which bytes a weight file holds, without reading them.

    A file in the huggingface_hub cache is a link to a blob named by its content's hash, the same
    on every host: that name.  Any other file: its size, mtime and inode, which every rewrite
    changes (a copy or an in-place save), even one that leaves the sampled blocks alone.
    """
    p = os.fspath(path)
    real = os.path.realpath(p)
    name = os.path.basename(real)
    if (real != os.path.abspath(p) and os.path.basename(os.path.dirname(real)) == "blobs"
            and len(name) in (40, 64) and set(name) <= _HEX):
        return b"blob:" + name.encode()
    st = os.stat(real)
    return b"stat:" + struct.pack("<QqQ", st.st_size, st.st_mtime_ns, st.st_ino)


def _weight_files(root: str) -> tuple[list[str], list[str]]:
    """(weight files, other files) of a checkpoint directory or single weight file, sorted."""
    if os.path.isfile(root):
        return ([root] if root.endswith(WEIGHT_SUFFIXES) else []), []
    if not os.path.isdir(root):
        return [], []
    names = sorted(n for n in os.listdir(root) if os.path.isfile(os.path.join(root, n)))
    return ([os.path.join(root, n) for n in names if n.endswith(WEIGHT_SUFFIXES)],
            [os.path.join(root, n) for n in names if not n.endswith(WEIGHT_SUFFIXES)])


def checkpoint_identity(path: str | os.PathLike, *, stamps: bool = True) -> str | None:
    """Cheap identity of the checkpoint at ``path``, a directory or one weight file (a GGUF); None if
    it holds no weight files.

    sha256 over every weight file's name, size, safetensors header and sampled tensor blocks
    (see :func:`_file_identity`) and the bytes of ``*.json`` files (config, index): the content,
    the same wherever a copy lies.  With ``stamps``, each weight file's :func:`file_stamp` too
    (mtime and inode outside the hub cache), so a file rewritten in place gets another identity
    even where the samples miss the change.  Reads a few tens of KiB per file, so it runs at
    start-up on checkpoints of any size.
    """
    weights, others = _weight_files(os.fspath(path))
    if not weights:
        return None
    h = hashlib.sha256(b"kvreuse-ckpt-v1")
    for w in weights:
        _file_identity(h, w)
    for o in others:
        if o.endswith(".json") and os.path.getsize(o) <= 16 << 20:
            with open(o, "rb") as f:
                h.update(os.path.basename(o).encode() + b"\0" + f.read())
    if stamps:
        h.update(b"stamps")
        for w in weights:
            h.update(os.path.basename(w).encode() + b"\0" + file_stamp(w))
    return h.hexdigest()


class AdapterUnresolved(LookupError):
    """A LoRA adapter named by a hub id whose files are not in the local huggingface_hub cache."""


def adapter_files(path: str) -> str:
    """Where vLLM loads a LoRA adapter from, resolved as its ``get_adapter_absolute_path`` does but
    never over the network: a local path as it is; a hub id, its snapshot in the local
    huggingface_hub cache (the one vLLM downloaded, or will load offline).  Raises
    :class:`AdapterUnresolved` for a hub id not in that cache, or one vLLM takes from ModelScope.
    """
    if os.path.isabs(path) or path.startswith("~") or os.path.exists(path):
        return os.path.abspath(os.path.expanduser(path))
    if os.environ.get("VLLM_USE_MODELSCOPE", "false").lower() == "true":
        raise AdapterUnresolved(f"LoRA adapter {path!r}: a ModelScope id, whose files kvreuse does not resolve")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, local_files_only=True)
    except Exception as e:  # not downloaded (yet), or not a valid hub id: vLLM's own load will say
        raise AdapterUnresolved(f"LoRA adapter {path!r}: not in the local huggingface_hub cache ({e})") from None


def adapter_identity(name: str, path: str | os.PathLike | None) -> bytes:
    """Key component of a LoRA adapter: its name, its path and its files' identity.

    vLLM's own prefix hash uses the name; the files' identity (:func:`checkpoint_identity` of
    :func:`adapter_files`, stamps included) keeps an adapter retrained in place, or a hub id whose
    repository moved on, from being served KV of its previous version.  Raises
    :class:`AdapterUnresolved` for a hub id whose files are not in the local cache.
    """
    p = "" if path is None else os.fspath(path)
    return _adapter_identity(name, p, adapter_files(p) if p else "")


def _adapter_identity(name: str, path: str, files: str) -> bytes:
    ident = checkpoint_identity(files) if files else None
    return b"\0".join([b"lora-v2", name.encode(), path.encode(), (ident or "").encode()])


def _listing(root: str) -> tuple:
    """What :func:`checkpoint_identity` of directory ``root`` depends on that ``stat`` calls see."""
    try:
        with os.scandir(root) as it:
            stats = [(e.name, e.stat()) for e in it if e.is_file()]
    except OSError:
        return ()
    return tuple(sorted((n, st.st_size, st.st_mtime_ns, st.st_ino) for n, st in stats))


class AdapterKeys:
    """Per-scheduler cache of :func:`adapter_identity`: an adapter's files are read again only when
    their listing (names, sizes, mtimes, inodes) or, for a hub id, the cached snapshot changes, as it
    does when vLLM reloads an adapter (``load_inplace``) or downloads a newer revision.

    ``of(lora_request)`` takes vLLM's ``LoRARequest`` (or None) and returns what
    :meth:`ChunkKey.of` wants as ``lora``; it raises :class:`AdapterUnresolved` for a hub id not in
    the local cache: that request is served without kvreuse, never keyed by the adapter's name alone.
    """

    def __init__(self, max_adapters: int = 1024) -> None:
        self._ids: dict[tuple, bytes] = {}
        self.max_adapters = max_adapters

    def of(self, lora_request: object | None) -> bytes | None:
        if lora_request is None:
            return None
        name = str(getattr(lora_request, "lora_name", "") or getattr(lora_request, "name", ""))
        path = str(getattr(lora_request, "lora_path", "") or getattr(lora_request, "path", "") or "")
        files = adapter_files(path) if path else ""
        memo = (name, path, files, _listing(files) if files else ())
        ident = self._ids.get(memo)
        if ident is None:
            if len(self._ids) >= self.max_adapters:
                self._ids.pop(next(iter(self._ids)))
            ident = self._ids[memo] = _adapter_identity(name, path, files)
        return ident


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
    """xxh3-128 over (model fingerprint, cache salt, LoRA adapter, token ids, multimodal content identifiers)."""

    digest: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.digest, bytes) or len(self.digest) != _DIGEST_BYTES:
            raise ValueError(f"digest: expected {_DIGEST_BYTES} bytes, got {self.digest!r}")

    def __hash__(self) -> int:  # the digest's own (the dataclass' builds a tuple: the store hashes keys a lot)
        return hash(self.digest)

    @classmethod
    def of(cls, model: bytes | ModelFingerprint, token_ids: Sequence[int] | np.ndarray | torch.Tensor,
           *, cache_salt: str | bytes | None = None, mm_ids: Sequence[str | bytes] = (),
           lora: str | bytes | None = None) -> "ChunkKey":
        """Key of a chunk.

        ``mm_ids`` are the content identifiers of the media inside the chunk, in order; ``lora``
        identifies the LoRA adapter the request runs with (:class:`AdapterKeys`), None for the base model.
        """
        return cls(cls.finish(cls.namespace_hasher(model, cache_salt=cache_salt, lora=lora), token_bytes(token_ids),
                              mm_ids))

    @staticmethod
    def namespace_hasher(model: bytes | ModelFingerprint, *, cache_salt: str | bytes | None = None,
                         lora: str | bytes | None = None) -> "xxhash.xxh3_128":
        """The key hash fed with everything but the chunk's content: copy it, then :meth:`finish` each chunk
        (what :meth:`of` does; a prompt's chunks share it)."""
        fp = model.digest if isinstance(model, ModelFingerprint) else model
        h = xxhash.xxh3_128()
        _feed(h, b"kvreuse-chunk-v2")
        _feed(h, fp)
        salt = cache_salt.encode() if isinstance(cache_salt, str) else cache_salt
        _feed(h, b"\0" if salt is None else b"\1" + salt)
        adapter = lora.encode() if isinstance(lora, str) else lora
        _feed(h, b"\0" if adapter is None else b"\1" + adapter)
        return h

    @staticmethod
    def finish(h: "xxhash.xxh3_128", tokens: bytes, mm_ids: Sequence[str | bytes] = ()) -> bytes:
        """The digest of a chunk: ``h`` (a copy of :meth:`namespace_hasher`) fed with the chunk's token bytes
        (:func:`token_bytes`) and media identifiers."""
        _feed(h, tokens)
        h.update(struct.pack("<Q", len(mm_ids)))
        for m in mm_ids:
            _feed(h, m.encode() if isinstance(m, str) else m)
        return h.digest()

    @classmethod
    def from_hex(cls, s: str) -> "ChunkKey":
        return cls(bytes.fromhex(s))

    def hex(self) -> str:
        return self.digest.hex()

    def __repr__(self) -> str:
        return f"ChunkKey({self.hex()})"
