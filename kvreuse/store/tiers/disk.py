"""Disk tier: one file per entry under ``disk_path/<model fingerprint hex>/``.

Writes go to a temporary name, are fsynced and renamed, so a file with the final name is always
complete.  On open the tier deletes leftover temporary files and indexes every entry file from
its header alone (one read of the first 16 KiB, on 16 threads; its size must match the header): files with a bad
header, of another model, or of the wrong size are deleted.  Payload checksums are verified when
an entry is read, segment by segment, so start-up time grows with the number of entries, not
their bytes.  A directory is owned by one store at a time (an exclusive ``flock`` on ``.lock``);
several models, and each tensor/pipeline-parallel rank, have their own subdirectory.

:func:`scan_index` reads the same headers without taking the lock, for a scheduler rebuilding
its directory of stored chunks at start-up.
"""

from __future__ import annotations

import fcntl
import gc
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

from kvreuse.store.config import StoreConfigError
from kvreuse.store.keys import ChunkKey
from kvreuse.store.persist import (PREFIX_BYTES, EntryCorrupt, EntryHeader, IndexRecord, decode_header,
                                   header_length)
from kvreuse.store.policy import EvictionPolicy

SUFFIX = ".kvc"
_HEAD_READ = 16 << 10  # one read holds the prefix and the header of all but very long chunks
_SCAN_THREADS, _SCAN_BATCH = 16, 1024


class FileReader:
    """Random reads from one entry file (the open descriptor survives a concurrent unlink)."""

    def __init__(self, fd: int, header: EntryHeader) -> None:
        self.fd, self.header = fd, header

    def read(self, offset: int, n: int) -> bytes:
        b = os.pread(self.fd, n, offset)
        if len(b) != n:
            raise EntryCorrupt(f"short read at {offset}: {len(b)} of {n} bytes")
        return b

    def read_into(self, offset: int, out: memoryview) -> None:
        """Read exactly ``len(out)`` bytes at ``offset`` straight into ``out`` (no intermediate copy)."""
        done, n = 0, out.nbytes
        while done < n:
            got = os.preadv(self.fd, [out[done:]], offset + done)
            if got <= 0:
                raise EntryCorrupt(f"short read at {offset}: {done} of {n} bytes")
            done += got

    def close(self) -> None:
        os.close(self.fd)


def _remove_file(path: str) -> None:
    """Delete a file; a file already gone or a read-only/failing disk is not an error (a later open cleans up)."""
    try:
        os.unlink(path)
    except OSError:
        pass


def _read_header(fd: int, key: ChunkKey, model: bytes) -> EntryHeader:
    first = os.pread(fd, _HEAD_READ, 0)  # prefix and, nearly always, the whole header in one read
    n = header_length(first)
    head = first if len(first) >= PREFIX_BYTES + n else os.pread(fd, PREFIX_BYTES + n, 0)
    return decode_header(head, model=model, key=key)


def _raw_head(path: str) -> tuple[bytes, int] | OSError:
    """(the file's first bytes, enough for its header; its size), read on a scan thread (I/O releases the GIL)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        return e
    try:
        first = os.pread(fd, _HEAD_READ, 0)
        try:
            n = PREFIX_BYTES + header_length(first)
        except EntryCorrupt:
            n = 0
        if len(first) < n:
            first = os.pread(fd, n, 0)
        return first, os.fstat(fd).st_size
    except OSError as e:
        return e
    finally:
        os.close(fd)


def _indexed(key: ChunkKey, model: bytes, raw: tuple[bytes, int] | OSError) -> EntryHeader:
    if isinstance(raw, OSError):
        raise raw
    head, size = raw
    h = decode_header(head, model=model, key=key)
    if size != h.total_bytes:
        raise EntryCorrupt("file size does not match its header")
    return h


def _scan_heads(files: list[tuple[str, str]]) -> Iterator[tuple[str, str, tuple[bytes, int] | OSError]]:
    """(hex key, path, raw head) of each file, in order; reads run on threads, one batch ahead.

    Start-up cost is one small read per file: on a cold disk its latency, not its bytes, is what
    adds up, so reads overlap.
    """
    with ThreadPoolExecutor(_SCAN_THREADS, thread_name_prefix="kvreuse-scan") as pool:
        batches = [files[i:i + _SCAN_BATCH] for i in range(0, len(files), _SCAN_BATCH)]
        nxt = [pool.submit(_raw_head, p) for _, p in batches[0]] if batches else []
        for j, batch in enumerate(batches):
            cur, nxt = nxt, ([pool.submit(_raw_head, p) for _, p in batches[j + 1]] if j + 1 < len(batches) else [])
            for (hexkey, path), fut in zip(batch, cur):
                yield hexkey, path, fut.result()


def model_dir(root: str, model: bytes) -> str:
    """The directory of one model fingerprint's entries under ``disk_path``."""
    return os.path.join(root, model.hex())


def _entry_files(d: str) -> Iterator[tuple[str, str]]:
    with os.scandir(d) as it:
        for de in it:
            if de.name.endswith(SUFFIX) and not de.name.startswith("."):
                yield de.name[: -len(SUFFIX)], de.path


def scan_index(disk_path: str, model_digests: bytes | Sequence[bytes]) -> Iterator[IndexRecord]:
    """Stored chunks of a disk tier, from headers only: what a scheduler's directory needs at start-up.

    ``model_digests``: one fingerprint digest, or every rank's (tensor/pipeline parallel): a chunk
    is yielded only when every rank's directory holds it, with rank 0's record (ranks store the
    same chunks with the same contexts, each its own heads or layers).  Files that are unreadable,
    of another model or damaged are skipped (the owning store deletes them); nothing is written
    and no lock is taken, so this may run while the store's process writes.
    """
    digests = [model_digests] if isinstance(model_digests, bytes) else list(model_digests)
    if not digests:
        return
    others = []
    for m in digests[1:]:
        d = model_dir(disk_path, m)
        others.append({k for k, _ in _entry_files(d)} if os.path.isdir(d) else set())
    d0 = model_dir(disk_path, digests[0])
    if not os.path.isdir(d0):
        return
    files = [(k, p) for k, p in _entry_files(d0) if all(k in o for o in others)]
    for hexkey, _, raw in _scan_heads(files):
        try:
            yield _indexed(ChunkKey.from_hex(hexkey), digests[0], raw).record()
        except (EntryCorrupt, ValueError, OSError):
            continue


class DiskTier:
    """Entry files on local disk under a byte budget (file bytes, headers included)."""

    name = "disk"

    def __init__(self, root: str, budget_bytes: int, model: bytes, policy: EvictionPolicy) -> None:
        self.dir = model_dir(root, model)
        self.budget_bytes, self.model, self.policy = budget_bytes, model, policy
        os.makedirs(self.dir, exist_ok=True)
        # read-only: an open writable descriptor would keep the filesystem from being remounted read-only
        self._lock = open(os.open(os.path.join(self.dir, ".lock"), os.O_RDONLY | os.O_CREAT, 0o644), "rb")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise StoreConfigError(f"disk_path: {self.dir} is in use by another store process") from None
        self.index: dict[ChunkKey, EntryHeader] = {}
        self.used_bytes = 0
        self.dropped_corrupt = 0
        self._scan()

    def path(self, key: ChunkKey) -> str:
        return os.path.join(self.dir, key.hex() + SUFFIX)

    def __contains__(self, key: ChunkKey) -> bool:
        return key in self.index

    def __len__(self) -> int:
        return len(self.index)

    def _scan(self) -> None:
        files = []
        for name in os.listdir(self.dir):
            p = os.path.join(self.dir, name)
            if name.endswith(".tmp"):
                _remove_file(p)  # a write that never reached its rename
            elif name.endswith(SUFFIX):
                files.append((name[: -len(SUFFIX)], p))
        # Headers are kept (many small objects, none cyclic): the cyclic GC would traverse all of them
        # again and again as they pile up, which costs more than reading them.
        gc_was_on = gc.isenabled()
        gc.disable()
        try:
            for hexkey, p, raw in _scan_heads(files):
                try:
                    h = _indexed(ChunkKey.from_hex(hexkey), self.model, raw)
                except (EntryCorrupt, ValueError, OSError):
                    self._drop_file(p)
                    continue
                self._add(h)
        finally:
            if gc_was_on:
                gc.enable()
        while self.used_bytes > self.budget_bytes:  # budget lowered since the last run
            self.remove(self.policy.peek(), evicted=True)

    def _drop_file(self, path: str) -> None:
        self.dropped_corrupt += 1
        _remove_file(path)

    def _add(self, h: EntryHeader) -> None:
        self.index[h.key] = h
        self.used_bytes += h.total_bytes
        self.policy.update(h.key, nbytes=h.total_bytes, cost=h.recompute_cost, hits=h.hits)

    # A write is three steps so that the store's lock is held only for the first and the last:
    # reserve (pick victims, account the bytes) → write_file (outside the lock: write, fsync,
    # rename) → commit (index the file) or unreserve (the write failed).

    def reserve(self, key: ChunkKey, n: int) -> list[tuple[ChunkKey, EntryHeader, FileReader | None]] | None:
        """Account ``n`` bytes for a new file of ``key``, evicting lowest priority first.

        Returns the victims, each with a reader opened before it left the index (so its bytes can
        still be copied elsewhere; the caller closes it and calls :meth:`unlink`), or None when
        ``n`` exceeds the budget.  An older file of ``key`` leaves the index (its file is replaced
        by the rename of :meth:`write_file`).
        """
        if n > self.budget_bytes:
            return None
        if key in self.index:
            h = self.index.pop(key)
            self.used_bytes -= h.total_bytes
            self.policy.remove(key)
        victims = []
        while self.used_bytes + n > self.budget_bytes:
            victim = self.policy.peek()
            assert victim is not None, "disk accounting holds bytes no entry owns"
            h = self.index.pop(victim)
            self.used_bytes -= h.total_bytes
            self.policy.evicted(victim)
            try:
                reader = FileReader(os.open(self.path(victim), os.O_RDONLY), h)
            except OSError:
                reader = None
            victims.append((victim, h, reader))
        self.used_bytes += n
        return victims

    def unreserve(self, n: int) -> None:
        self.used_bytes -= n

    def write_file(self, key: ChunkKey, head: bytes, bufs: list) -> None:
        """Write an entry durably under its final name (temporary name, fsync, rename, fsync the directory)."""
        tmp = os.path.join(self.dir, f".{key.hex()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(head)
                for b in bufs:
                    f.write(memoryview(b))
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, self.path(key))
            dfd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            for p in (tmp, self.path(key)):
                _remove_file(p)
            raise

    def commit(self, head: bytes, key: ChunkKey) -> EntryHeader:
        """Index a file :meth:`write_file` wrote (its bytes were reserved)."""
        h = decode_header(head, model=self.model, key=key)
        self.index[h.key] = h
        self.policy.update(h.key, nbytes=h.total_bytes, cost=h.recompute_cost, hits=h.hits)
        assert self.used_bytes <= self.budget_bytes
        return h

    def unlink(self, key: ChunkKey) -> None:
        """Delete ``key``'s file (after it left the index)."""
        _remove_file(self.path(key))

    def open(self, key: ChunkKey) -> FileReader | None:
        """A reader over ``key``'s file, or None (missing or bad file: dropped)."""
        if key not in self.index:
            return None
        try:
            fd = os.open(self.path(key), os.O_RDONLY)
        except FileNotFoundError:
            self.remove(key)
            return None
        try:
            return FileReader(fd, _read_header(fd, key, self.model))
        except (EntryCorrupt, OSError):
            os.close(fd)
            self.drop(key)
            return None

    def read_blob(self, key: ChunkKey) -> bytes | None:
        r = self.open(key)
        if r is None:
            return None
        try:
            return r.read(0, r.header.total_bytes)
        finally:
            r.close()

    def drop(self, key: ChunkKey) -> None:
        """Remove an entry found to be corrupt."""
        self.remove(key)
        self.dropped_corrupt += 1

    def remove(self, key: ChunkKey, *, evicted: bool = False) -> None:
        h = self.index.pop(key, None)
        if h is None:
            return
        self.used_bytes -= h.total_bytes
        (self.policy.evicted if evicted else self.policy.remove)(key)
        _remove_file(self.path(key))

    def close(self) -> None:
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
