"""Segmented prefill: a vLLM scheduler that places stored chunks anywhere in a prompt.

Written against vLLM 0.32.0's v1 `Scheduler` (`vllm/v1/core/sched/scheduler.py`).  vLLM's
connector API can only claim a prefix (`get_num_new_matched_tokens`); upstream's RFC/PR for
gapped external hits (vLLM #25950, #32785) is in no release.  Three narrow hooks do the rest:

  * `schedule`: before vLLM schedules a step, each running request that has reached the start
    of its next placement jumps over it (`num_computed_tokens += placement`); vLLM then
    allocates its blocks as for any computed prefix, and the connector's worker writes the
    placed KV (relocated, patched) in `start_load_kv`, before the forward pass that attends to it;
  * `_try_schedule_encoder_inputs` and `_reserve_prefill_lookahead` (called for running and
    waiting requests alike, right before block allocation): a step's new tokens end where the
    next placement starts, so each computed segment attends to everything before it and a
    placed image never reaches the vision encoder.

The step that writes a placement is marked as having synchronous loads (`has_sync_kv_loads`), so
the worker places the KV before the forward pass rather than after it.

Everything else is vLLM's own: the prefix hit and the connector's claim at the start, chunked
prefill and the token budget, preemption (a resumed request is re-planned by the connector),
aborts, failed loads (rolled back by `get_block_ids_with_load_errors`), several requests per step.

One fix to vLLM's handling of failed loads (`_update_requests_with_invalid_blocks`): under the
"recompute" policy vLLM keeps a block that failed to load in its prefix cache and lets only the
first request holding it recompute it, the others treating it as computed.  When that request is
aborted (or preempted) before its recompute, the block is never written, and every request that
hits it in the prefix cache, or already holds it, reads KV that was never there.  Here each
request holding a failed block rolls back to it and recomputes it, and failed blocks leave the
prefix cache at once.  vLLM's engine processes the aborts that arrive while a step runs before
that step's output (`EngineCore.step`: `_process_aborts_queue`, then `update_from_output`), so a
request aborted then is freed, its blocks still in the prefix cache under their hashes, before its
failed load is seen, and no request holds them to be rolled back: `finish_requests` keeps the
block table of each request it frees while a step runs, and those blocks, from the first failed
one on, leave the prefix cache too (else a later request with the same first blocks reads slots
that the failed load never wrote).

The hooks are private methods of vLLM's scheduler: `HOOKS` names each with the parameters passed
to it, and a scheduler class lacking one is refused at startup (`check_hooks`);
`tests/connector/test_segmented_hooks.py` runs vLLM's own `Scheduler` and fails when vLLM stops
calling one.

Asynchronous scheduling is refused at startup: pass `--no-async-scheduling` (`kvreuse serve`
does).  On vLLM's CPU backend this changes nothing (the CPU platform turns asynchronous scheduling
off for every server, vLLM alone included); on a GPU it gives up the overlap of scheduling with the
forward that vLLM's `AsyncScheduler` brings.  Select it with
`--scheduler-cls kvreuse.connector.segmented.SegmentedScheduler`.
"""

from __future__ import annotations

import inspect
import time
from typing import Any

from vllm.v1.core.sched.scheduler import Scheduler

from kvreuse.errors import KVReuseError

from kvreuse.connector.segmented_cls import SCHEDULER_CLS  # noqa: E402

# vLLM `Scheduler` methods SegmentedScheduler overrides, with the leading parameters it passes on (vLLM 0.32)
HOOKS: dict[str, tuple[str, ...]] = {
    "schedule": (),
    "update_from_output": ("scheduler_output", "model_runner_output"),
    "_update_requests_with_invalid_blocks": ("requests", "invalid_block_ids", "num_scheduled_tokens",
                                             "evict_blocks"),
    "_try_schedule_encoder_inputs": ("request", "num_computed_tokens", "num_new_tokens"),
    "_reserve_prefill_lookahead": ("request", "num_computed_tokens", "num_new_tokens"),
    "_preempt_request": ("request", "timestamp"),
    "finish_requests": ("request_ids", "finished_status"),
}


def check_hooks(base: type = Scheduler) -> None:
    """Refuse (KVReuseError) a vLLM scheduler class that lacks a hook SegmentedScheduler overrides, or takes
    other parameters than it passes: the override would never run, or run with the wrong arguments."""
    bad = []
    for name, params in HOOKS.items():
        fn = getattr(base, name, None)
        if not callable(fn):
            bad.append(f"{name} (missing)")
            continue
        got = tuple(p for p in inspect.signature(fn).parameters if p != "self")[:len(params)]
        if got != params:
            bad.append(f"{name}({', '.join(got)}) (expected {', '.join(params)})")
    if bad:
        raise KVReuseError(f"kvreuse: --scheduler-cls {SCHEDULER_CLS} overrides hooks this vLLM's scheduler "
                           f"({base.__module__}.{base.__qualname__}) does not have: {'; '.join(bad)}; "
                           "use a supported vLLM (kvreuse.connector.compat.SUPPORTED_VLLM)")


class SegmentedScheduler(Scheduler):
    """vLLM's scheduler plus segment-by-segment prefill of kvreuse placements."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_hooks(Scheduler)
        super().__init__(*args, **kwargs)
        if self.scheduler_config.async_scheduling:
            raise KVReuseError("kvreuse: the segmented-prefill scheduler (--scheduler-cls " + SCHEDULER_CLS + ") runs "
                               "with synchronous scheduling only; add --no-async-scheduling")
        from kvreuse.connector.connector import KVReuseConnector

        if not isinstance(self.connector, KVReuseConnector):
            raise KVReuseError("kvreuse: --scheduler-cls " + SCHEDULER_CLS + " needs the kvreuse connector: add "
                               "--kv-transfer-config '{\"kv_connector\":\"KVReuseConnector\",\"kv_role\":\"kv_both\"}'")
        self._segments = self.connector.enable_segments(self.hash_block_size)
        self._scheduled_at: float | None = None
        self._in_flight: frozenset[str] | None = None  # requests of the step being executed (schedule → output)
        self._freed_in_flight: dict[str, list[int]] = {}  # those finished meanwhile (aborted): their block ids

    def schedule(self, *args: Any, **kwargs: Any):
        for request in self.running:
            n = self._segments.advance(request)
            if n:
                request.num_computed_tokens += n
                ps = request.prefill_stats  # what clients see as cached_tokens
                if ps is not None and request.num_preemptions <= 0:
                    ps.num_external_cached_tokens += n
                    ps.num_cached_tokens += n
                    ps.num_computed_tokens -= n
        out = super().schedule(*args, **kwargs)
        meta = out.kv_connector_metadata
        if meta is not None and getattr(meta, "loads", None):
            # vLLM starts a step's loads before the forward only when it saw a synchronous claim itself
            # (a new request's prefix); a placement in a running request needs the same ordering
            out.has_sync_kv_loads = True
        self._scheduled_at = time.perf_counter() if out.total_num_scheduled_tokens else None
        self._in_flight = frozenset(out.num_scheduled_tokens)
        return out

    def finish_requests(self, request_ids: Any, finished_status: Any, *args: Any, **kwargs: Any):
        """vLLM's; a request freed while its step runs (an abort) leaves its block table here first, for
        `update_from_output` to evict the blocks a failed load of that step left unwritten."""
        if request_ids is not None and not isinstance(request_ids, str):
            request_ids = list(request_ids)  # read twice: here and by vLLM
        if self._in_flight:
            ids = (request_ids,) if isinstance(request_ids, str) else \
                self._in_flight if request_ids is None else request_ids
            for rid in ids:
                if rid in self._in_flight and rid in self.requests:
                    self._freed_in_flight[rid] = list(self.kv_cache_manager.get_block_ids(rid)[0])
        return super().finish_requests(request_ids, finished_status, *args, **kwargs)

    def _preempt_request(self, request: Any, timestamp: float, *args: Any, **kwargs: Any) -> None:
        """vLLM's, then the request's plain block hashes back at once: a request resumed in the same step
        (vLLM's `reset_prefix_cache` does that) is looked up in the prefix cache under them, never under the
        salt of its approximate placements (`kvreuse.connector.fidelity`)."""
        super()._preempt_request(request, timestamp, *args, **kwargs)
        self._segments.preempted([request.request_id])

    def update_from_output(self, scheduler_output: Any, model_runner_output: Any):
        if self._scheduled_at is not None:  # a synchronous step: schedule → execute → here
            self._segments.cost.observe_step(time.perf_counter() - self._scheduled_at,
                                             scheduler_output.total_num_scheduled_tokens,
                                             len(scheduler_output.num_scheduled_tokens))
            self._scheduled_at = None
        self._in_flight = None
        freed, self._freed_in_flight = self._freed_in_flight, {}
        bad = getattr(getattr(model_runner_output, "kv_connector_output", None), "invalid_block_ids", None)
        if bad and freed:
            evict = set()
            for ids in freed.values():
                first = next((i for i, b in enumerate(ids) if b in bad), None)
                if first is not None:
                    evict.update(ids[first:])  # the failed block and those computed after it
            if evict:
                self.kv_cache_manager.evict_blocks(evict)
        return super().update_from_output(scheduler_output, model_runner_output)

    def _update_requests_with_invalid_blocks(self, requests: Any, invalid_block_ids: set[int],
                                             num_scheduled_tokens: dict[str, int], evict_blocks: bool = True):
        """vLLM's, one request at a time (each rolls back to its own first failed block: none counts on another
        request to recompute a block they share), and the failed blocks and those after them are evicted
        from the prefix cache (an aborted request's blocks stay there otherwise, never written)."""
        affected, tokens, evict = set(), 0, set()
        for request in list(requests):
            a, n, e = super()._update_requests_with_invalid_blocks([request], invalid_block_ids, num_scheduled_tokens,
                                                                   evict_blocks)
            affected |= a
            tokens += n
            evict |= e
        if evict:
            self.kv_cache_manager.evict_blocks(evict)
        return affected, tokens, evict

    def _try_schedule_encoder_inputs(self, request: Any, num_computed_tokens: int, num_new_tokens: int,
                                     *args: Any, **kwargs: Any):
        num_new_tokens = self._segments.cap(request, num_computed_tokens, num_new_tokens)
        return super()._try_schedule_encoder_inputs(request, num_computed_tokens, num_new_tokens, *args, **kwargs)

    def _reserve_prefill_lookahead(self, request: Any, num_computed_tokens: int, num_new_tokens: int) -> int:
        num_new_tokens = self._segments.cap(request, num_computed_tokens, num_new_tokens)
        return super()._reserve_prefill_lookahead(request, num_computed_tokens, num_new_tokens)
