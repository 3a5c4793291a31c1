"""SegmentedScheduler on vLLM's own `Scheduler`: every hook it overrides exists there and vLLM still calls it.

The hooks are private methods of vLLM's scheduler (`kvreuse.connector.segmented.HOOKS`); a vLLM that
renames one, or stops calling it from `schedule` / `update_from_output`, would leave kvreuse's
override dead and placements unplanned, silently.  Here a real vLLM scheduler (tiny 1-layer model,
the kvreuse connector, `SegmentedScheduler` with each hook counted) runs a chunked text prefill, a
prompt with an image placeholder and a failed load.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

pytest.importorskip("vllm")

from vllm import SamplingParams  # noqa: E402
from vllm.config import CacheConfig, KVTransferConfig, ModelConfig, SchedulerConfig, VllmConfig  # noqa: E402
from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange  # noqa: E402
from vllm.utils.hashing import get_hash_fn_by_name  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash  # noqa: E402
from vllm.v1.core.sched.output import SchedulerOutput  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec  # noqa: E402
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput  # noqa: E402
from vllm.v1.request import Request, RequestStatus  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402

from kvreuse.connector.plugin import register  # noqa: E402
from kvreuse.connector.segmented import HOOKS, SegmentedScheduler, check_hooks  # noqa: E402
from kvreuse.connector.segmented_cls import SCHEDULER_CLS  # noqa: E402
from kvreuse.errors import KVReuseError  # noqa: E402

BS = 16


def _counted(name: str):
    def hook(self, *args, **kwargs):
        self.calls[name] += 1
        return getattr(super(CountingScheduler, self), name)(*args, **kwargs)
    hook.__name__ = name
    return hook


# SegmentedScheduler with each hook counted (`calls`), then handed on unchanged
CountingScheduler = type("CountingScheduler", (SegmentedScheduler,), {n: _counted(n) for n in HOOKS})


def _vllm_config(model_dir) -> VllmConfig:
    register()
    cache = CacheConfig(block_size=BS, enable_prefix_caching=True)
    cache.num_gpu_blocks = 64
    return VllmConfig(
        model_config=ModelConfig(model=str(model_dir), dtype="float32", max_model_len=512, seed=0),
        scheduler_config=SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=4, max_model_len=512,
                                         enable_chunked_prefill=True, async_scheduling=False,
                                         is_encoder_decoder=False, scheduler_cls=SCHEDULER_CLS),
        cache_config=cache,
        kv_transfer_config=KVTransferConfig(kv_connector="KVReuseConnector", kv_role="kv_both",
                                            kv_load_failure_policy="recompute"))


def _scheduler(tiny_1layer):
    vc = _vllm_config(tiny_1layer)
    kvc = KVCacheConfig(num_blocks=64, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(
        ["model.layers.0.self_attn.attn"], FullAttentionSpec(block_size=BS, num_kv_heads=1, head_size=32,
                                                             dtype=torch.float32))])
    CountingScheduler.calls = Counter()
    s = CountingScheduler(vllm_config=vc, kv_cache_config=kvc, structured_output_manager=StructuredOutputManager(vc),
                          block_size=BS, log_stats=False)
    hash_fn = get_hash_fn_by_name(vc.cache_config.prefix_caching_hash_algo)
    init_none_hash(hash_fn)
    s.block_hasher = get_request_block_hasher(BS, hash_fn)
    return s


@pytest.fixture(scope="module")
def scheduler(tiny_1layer):
    s = _scheduler(tiny_1layer)
    yield s
    s.shutdown()


def _request(s, rid: str, prompt: list[int], mm: list[MultiModalFeatureSpec] | None = None) -> Request:
    return Request(rid, prompt_token_ids=prompt, sampling_params=SamplingParams(max_tokens=4), pooling_params=None,
                   mm_features=mm, block_hasher=s.block_hasher)


def _step(s, out: SchedulerOutput, invalid: set[int] = frozenset()) -> None:
    """The model runner's answer to `out`: a token for each request whose prompt is done, failed loads `invalid`."""
    ids = list(out.num_scheduled_tokens)
    done = [s.requests[i].num_computed_tokens >= s.requests[i].num_prompt_tokens for i in ids]
    s.update_from_output(out, ModelRunnerOutput(
        req_ids=ids, req_id_to_index={r: n for n, r in enumerate(ids)},
        sampled_token_ids=[[7] if d else [] for d in done],
        kv_connector_output=KVConnectorOutput(invalid_block_ids=set(invalid))))


def test_every_hook_exists_on_vllms_scheduler_with_the_parameters_passed():
    check_hooks(Scheduler)
    for name in HOOKS:
        assert name in vars(SegmentedScheduler), f"{name} is listed in HOOKS but not overridden"
    for name in HOOKS:  # a vLLM whose scheduler lost one is refused at startup
        gone = type("Renamed", (Scheduler,), {name: None})
        with pytest.raises(KVReuseError, match=name):
            check_hooks(gone)
    assert "has_sync_kv_loads" in SchedulerOutput.__dataclass_fields__  # set by SegmentedScheduler.schedule


def test_vllm_calls_every_hook_segmented_scheduler_overrides(scheduler):
    s = scheduler
    # a text prompt longer than the step's token budget (32): prefilled in three steps, waiting then running
    text = _request(s, "text", list(range(10, 90)))
    s.add_request(text)
    for _ in range(3):
        _step(s, s.schedule())
    assert text.num_computed_tokens == 80
    assert s.calls["_reserve_prefill_lookahead"] >= 3 and s.calls["schedule"] == 3
    assert s.calls["update_from_output"] == 3

    # a prompt with an image placeholder: vLLM asks the encoder-input hook how far this step may go
    image = MultiModalFeatureSpec(data=None, modality="image", identifier="img-0",
                                  mm_position=PlaceholderRange(offset=8, length=16))
    s.add_request(_request(s, "image", list(range(100, 140)), [image]))
    before = s.calls["_try_schedule_encoder_inputs"]
    out = s.schedule()
    assert s.calls["_try_schedule_encoder_inputs"] > before
    _step(s, out)

    # a failed load reported by the worker: vLLM hands the running requests to the invalid-block hook
    s.add_request(_request(s, "failed", list(range(200, 260))))
    out = s.schedule()
    failed = s.requests["failed"]
    assert out.num_scheduled_tokens.get("failed")
    _step(s, out)
    block = s.kv_cache_manager.get_block_ids("failed")[0][0]
    before = s.calls["_update_requests_with_invalid_blocks"]
    _step(s, s.schedule(), invalid={block})
    assert s.calls["_update_requests_with_invalid_blocks"] > before
    assert failed.num_computed_tokens == 0  # rolled back to its first failed block

    # preemption (vLLM preempts every running request here): the request's plain block hashes come back
    _step(s, s.schedule())
    assert s.running
    s.reset_prefix_cache(reset_running_requests=True)
    assert s.calls["_preempt_request"] > 0 and not s.running
    s.finish_requests(None, RequestStatus.FINISHED_ABORTED)  # what vLLM's engine calls for an abort
    assert not s.requests
    assert set(HOOKS) <= {n for n, c in s.calls.items() if c}, s.calls


def test_a_request_aborted_while_its_load_fails_leaves_no_unwritten_block_in_the_prefix_cache(tiny_1layer):
    """vLLM's engine frees the requests aborted during a step before it reads that step's output
    (`EngineCore.step`), so no running request holds the failed block to roll back: the block, cached under
    its hash when the step was scheduled, stays in the prefix cache unwritten unless `finish_requests`
    kept the aborted request's blocks for `update_from_output` to evict."""
    s = _scheduler(tiny_1layer)
    try:
        prompt = list(range(300, 364))  # 4 blocks; the first step (budget 32) fills and caches two
        s.add_request(_request(s, "a", prompt))
        out = s.schedule()
        assert out.num_scheduled_tokens["a"] == 32
        blocks = list(s.kv_cache_manager.get_block_ids("a")[0])
        s.finish_requests("a", RequestStatus.FINISHED_ABORTED)  # the client went away while the step ran
        s.update_from_output(out, ModelRunnerOutput(  # ... and the step's load into block 0 failed
            req_ids=["a"], req_id_to_index={"a": 0}, sampled_token_ids=[[]],
            kv_connector_output=KVConnectorOutput(invalid_block_ids={blocks[0]})))
        s.add_request(_request(s, "b", prompt))
        out = s.schedule()
        (new,) = out.scheduled_new_reqs
        assert new.req_id == "b" and new.num_computed_tokens == 0, "b hit the blocks a's failed load never wrote"
        assert s.calls["finish_requests"] >= 1
    finally:
        s.shutdown()
