"""One engine, steps driven by hand: a request's load fails, the request is aborted before its recompute,
and another request with the same prompt follows (run by `tests/connector/test_failed_load_abort.py`).

    python -m tests.support.failed_load_abort MODEL_DIR OUT.json [after|with]

The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) so that the abort lands exactly
between the step whose load failed and the next one.  Writes, for the request that follows and for a
reference (the same prompt under its own `cache_salt`: no prefix hit, no stored chunk, computed from
scratch), the greedy tokens, their logprobs and the prompt tokens served from a cache.
"""

from __future__ import annotations

import json
import os
import random
import sys

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main(model: str, out: str, scenario: str = "after") -> None:
    """`scenario` "after": the next request arrives after the abort (and hits the failed blocks in vLLM's
    prefix cache); "with": it arrives in the same step as the failing one (and holds those blocks)."""
    from vllm import EngineArgs, LLMEngine, SamplingParams
    from vllm.config import KVTransferConfig

    from kvreuse.connector.segmented_cls import SCHEDULER_CLS

    kv = KVTransferConfig(kv_connector="KVReuseConnector", kv_role="kv_both", kv_load_failure_policy="recompute",
                          kv_connector_extra_config={"allow_fault_injection": True,
                                                     "policy": {"fidelity": "fast"}})
    eng = LLMEngine.from_engine_args(EngineArgs(
        model=model, enforce_eager=True, dtype="float32", gpu_memory_utilization=0.4, max_model_len=2048, seed=0,
        max_num_batched_tokens=2048, enable_prefix_caching=True, num_gpu_blocks_override=64,
        kv_transfer_config=kv, scheduler_cls=SCHEDULER_CLS, async_scheduling=False))
    rng = random.Random(0)
    vocab = eng.model_config.get_vocab_size()

    def tokens(n: int) -> list[int]:
        return [rng.randrange(10, vocab) for _ in range(n)]

    def params(extra: dict | None = None) -> SamplingParams:
        return SamplingParams(max_tokens=8, temperature=0.0, logprobs=1, extra_args=extra)

    def drain() -> dict:
        done = {}
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished:
                    done[o.request_id] = o
        return done

    head, doc = tokens(256), tokens(640)
    prompt = head + doc + tokens(20)
    eng.add_request("warm", {"prompt_token_ids": head + doc + tokens(20)}, params())  # stores the chunks
    drain()
    eng.reset_prefix_cache()
    for i in range(6):  # other prompts overwrite the freed blocks (which still held the warm prompt's KV)
        eng.add_request(f"churn{i}", {"prompt_token_ids": tokens(900)}, params())
        drain()
    eng.reset_prefix_cache()
    # claims its prefix from the store (exact: same context), and its load fails
    eng.add_request("failing", {"prompt_token_ids": prompt},
                    params({"kv_transfer_params": {"kvreuse": {"inject_load_failure": True}}}))
    if scenario == "with":
        eng.add_request("next", {"prompt_token_ids": prompt}, params())
    eng.step()
    eng.abort_request(["failing"])  # before the step that would recompute its blocks
    if scenario == "after":
        eng.add_request("next", {"prompt_token_ids": prompt}, params())
    eng.add_request("reference", {"prompt_token_ids": prompt, "cache_salt": "reference"}, params())
    done = drain()
    res = {}
    for rid in ("next", "reference"):
        c = done[rid].outputs[0]
        res[rid] = {"tokens": list(c.token_ids), "logprobs": [d[t].logprob for d, t in zip(c.logprobs, c.token_ids)],
                    "cached_tokens": done[rid].num_cached_tokens}
    with open(out, "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
