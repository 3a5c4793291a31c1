"""A huggingface_hub cache laid out on disk as the library lays it out, for tests that resolve hub ids offline.

    put_snapshot(cache, "org/lora", {"adapter_model.safetensors": b"..."}, commit="a" * 40)

writes ``<cache>/models--org--lora/blobs/<sha256>`` (each file's bytes, named by their hash),
``snapshots/<commit>/<name>`` (a relative link to its blob) and ``refs/main`` (the commit), which is
what ``huggingface_hub.snapshot_download(..., local_files_only=True)`` reads.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def put_snapshot(cache: str | os.PathLike, repo_id: str, files: dict[str, bytes], commit: str) -> Path:
    """Add one revision of ``repo_id`` to ``cache`` and point ``main`` at it; returns the snapshot directory."""
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            blob.write_bytes(data)
        (snap / name).symlink_to(os.path.join("..", "..", "blobs", blob.name))
    (repo / "refs" / "main").write_text(commit)
    return snap
