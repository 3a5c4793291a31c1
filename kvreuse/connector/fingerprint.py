"""The model fingerprint of a vLLM config: what makes stored KV usable by this server.

Architecture, HF config, dtypes, quantization, tensor/pipeline-parallel rank, and the weights: the
checkpoint files' content (names, sizes, safetensors headers, sampled blocks) and each file's stamp
(size, mtime and inode; a hub cache blob's content hash), so a checkpoint rewritten in place gets other
keys.  Where the files cannot be read (a remote or dummy loader, object storage), the `weights_version`
config key declares the weights' identity, and kvreuse refuses to start without it.  Given where files
exist, `weights_version` replaces the stamps (mtimes and inodes differ between hosts' copies of one
checkpoint), so instances on several hosts share a Redis tier; it must then change whenever the weights do.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import TYPE_CHECKING

from kvreuse.connector.config import ConnectorConfigError
from kvreuse.store import ModelFingerprint
from kvreuse.store.keys import checkpoint_identity

if TYPE_CHECKING:
    from vllm.config import VllmConfig

# vLLM load formats that read the weights from the checkpoint's files at `model` (a directory, a hub snapshot,
# one GGUF file); any other (dummy, tensorizer, ipc_cache, modelexpress, a plugin's) loads them from elsewhere.
FILE_LOAD_FORMATS = frozenset({"auto", "hf", "pt", "safetensors", "npcache", "fastsafetensors", "instanttensor",
                               "mistral", "sharded_state", "runai_streamer", "runai_streamer_sharded"})


def _checkpoint_path(vllm_config: "VllmConfig") -> str | None:
    """The local files vLLM loads the weights from, or None where they are not local files."""
    mc, lc = vllm_config.model_config, vllm_config.load_config
    load_format = str(getattr(lc.load_format, "value", lc.load_format)).lower()
    if load_format not in FILE_LOAD_FORMATS or getattr(mc, "model_weights", ""):
        return None  # e.g. object storage: `model` is a directory of configs, the weights stream from elsewhere
    if os.path.exists(mc.model):
        return mc.model
    try:  # a hub model already downloaded: its snapshot directory (never a network call)
        from huggingface_hub import snapshot_download

        return snapshot_download(mc.model, revision=mc.revision, local_files_only=True)
    except Exception:
        return None


def weights_identity(vllm_config: "VllmConfig", weights_version: str | None = None) -> str:
    """Identity of the weights, read at start-up: the checkpoint files' content (names, sizes, safetensors
    headers, sampled blocks) and where they are (size, mtime and inode; a hub blob's content hash), or the
    declared `weights_version` in place of where they are.

    Without readable files (a remote or dummy loader, object storage, a hub model not in the local cache)
    `weights_version` is required: raises ConnectorConfigError naming it.  Given, it replaces the files'
    mtimes and inodes, so instances holding their own copies of one checkpoint share a Redis tier.
    """
    mc = vllm_config.model_config
    src = getattr(mc, "model_weights", "") or mc.model  # object storage: the original URI
    path = _checkpoint_path(vllm_config)
    ident = checkpoint_identity(path, stamps=weights_version is None) if path else None
    if ident is None and weights_version is None:
        lc = vllm_config.load_config
        raise ConnectorConfigError(
            f"weights_version: required, because kvreuse cannot read the weights of {src!r} "
            f"(load_format {str(getattr(lc.load_format, 'value', lc.load_format))!r}) to tell when they change, and "
            "stored KV of other weights must never be served; set \"weights_version\" in kv_connector_extra_config "
            "to a string that changes whenever the weights do (e.g. the checkpoint's revision or content hash)")
    parts = [ident or f"unread:{src}@{mc.revision or ''}"]
    if weights_version is not None:
        parts.append(f"version:{weights_version}")
    return ";".join(parts)


def model_fingerprint(vllm_config: "VllmConfig", tp_rank: int = 0, pp_rank: int = 0, *,
                      weights_version: str | None = None) -> ModelFingerprint:
    """Identity of the served KV: architecture, weights (:func:`weights_identity` and HF config), dtypes,
    quantization, TP/PP rank.

    Rank 0's fingerprint names chunk keys (the scheduler computes them); each rank stores and
    looks up entries under its own fingerprint (its own heads and layers).
    """
    mc = vllm_config.model_config
    hf = mc.hf_config
    cfg = json.dumps(hf.to_dict(), sort_keys=True, default=str).encode()
    weights = f"{weights_identity(vllm_config, weights_version)}#{hashlib.sha256(cfg).hexdigest()[:32]}"
    arch = (getattr(hf, "architectures", None) or [type(hf).__name__])[0]
    pc = vllm_config.parallel_config
    return ModelFingerprint(arch, weights, str(mc.dtype), tp_rank, pc.tensor_parallel_size,
                            kv_cache_dtype=str(vllm_config.cache_config.cache_dtype),
                            quantization=str(mc.quantization or "none"), pp_rank=pp_rank,
                            pp_size=pc.pipeline_parallel_size)
