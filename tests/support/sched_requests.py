"""Stand-ins for vLLM's `Request` and `SchedulerOutput` on the scheduler side, for tests (and
bench/repair_frontier.py) that drive `SchedulerSide` without vLLM.

`SchedulerSide` reads only these fields of a request; `hash_block` > 0 fills `block_hashes` with one
32-byte value per full block, chained over the prefix as vLLM's hasher does (`update_block_hashes`
appends the hashes of new full blocks from the last one), so salting and unsalting can be checked.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from types import SimpleNamespace


@dataclass
class SchedRequest:
    request_id: str
    prompt_token_ids: list[int]
    num_computed_tokens: int = 0
    kv_transfer_params: dict | None = None
    cache_salt: str | None = None
    mm_features: list = field(default_factory=list)
    lora_request: object = None
    block_hashes: list = field(default_factory=list)
    hash_block: int = 0

    def __post_init__(self) -> None:
        self.update_block_hashes()

    def update_block_hashes(self) -> None:
        if not self.hash_block:
            return
        bs, toks = self.hash_block, self.prompt_token_ids
        for i in range(len(self.block_hashes), len(toks) // bs):
            parent = self.block_hashes[-1] if self.block_hashes else b""
            self.block_hashes.append(hashlib.sha256(parent + repr(toks[i * bs:(i + 1) * bs]).encode()).digest())


def message(seed: int, n: int, start: int = 2) -> list[int]:
    """One message: a boundary token `start`, then n seeded tokens."""
    rng = random.Random(seed)
    return [start] + [rng.randrange(10, 500) for _ in range(n)]


def sched_out(reqs, scheduled):
    """A `SchedulerOutput` stand-in: `reqs` newly scheduled, `scheduled` {request id: tokens this step}."""
    return SimpleNamespace(scheduled_new_reqs=[SimpleNamespace(req_id=r.request_id, num_computed_tokens=r.num_computed_tokens)
                                               for r in reqs],
                           scheduled_cached_reqs=SimpleNamespace(req_ids=[], num_computed_tokens=[]),
                           num_scheduled_tokens=scheduled, scheduled_encoder_inputs={})


def run_to_end(s, r: SchedRequest, blocks=lambda rid: list(range(64)), metas: list | None = None):
    """Drive one request as the segmented scheduler would, one segment per step; returns the loads
    (and appends each step's metadata to `metas`)."""
    loads = []
    s.after_alloc(r, s.matched(r, 0))
    r.num_computed_tokens = s.reqs[r.request_id].plan.leading
    n = len(r.prompt_token_ids)
    while r.num_computed_tokens < n:
        r.num_computed_tokens += s.advance(r)
        new = s.cap(r, r.num_computed_tokens, n - r.num_computed_tokens)
        out = sched_out([r], {r.request_id: new})
        meta = s.build_meta(out, blocks)
        if metas is not None:
            metas.append(meta)
        loads += [(it.dst_start, it.dst_end) for ld in meta.loads for it in ld.items]
        r.num_computed_tokens += new
    return loads
