"""A directory on a disk that fills up, and one that turns read-only, for fault tests.

As root: a real tmpfs of ``size`` bytes (``mount -t tmpfs``), remounted read-only on demand.
Otherwise: a plain directory with ``RLIMIT_FSIZE`` lowered to ``file_limit`` for this process
while the context is open (a write past it in one file fails with EFBIG, SIGXFSZ ignored), and
read-only through directory permissions.  ``kind`` says which one a test got.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
from typing import Iterator


def _can_mount() -> bool:
    return os.geteuid() == 0


@contextlib.contextmanager
def small_disk(path: str, size: int, file_limit: int = 64 << 10) -> Iterator[tuple[str, str]]:
    """Yields ``(directory, kind)``: ``kind`` is "tmpfs" (the filesystem holds ``size`` bytes) or "fsize"."""
    os.makedirs(path, exist_ok=True)
    if _can_mount() and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                                       capture_output=True).returncode == 0:
        try:
            yield path, "tmpfs"
        finally:
            subprocess.run(["umount", "-l", path], capture_output=True)
        return
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_sig = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, old_limit[1]))
    try:
        yield path, "fsize"
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_sig)


@contextlib.contextmanager
def read_only(path: str, kind: str) -> Iterator[None]:
    """Make the directory tree at ``path`` (from :func:`small_disk`) read-only for the context."""
    if kind == "tmpfs":
        subprocess.run(["mount", "-o", "remount,ro", path], check=True)
        try:
            yield
        finally:
            subprocess.run(["mount", "-o", "remount,rw", path], check=True)
        return
    dirs = [d for d, _, _ in os.walk(path)]
    for d in dirs:
        os.chmod(d, 0o555)
    try:
        yield
    finally:
        for d in dirs:
            os.chmod(d, 0o755)
