"""Stand-ins for vLLM's `Request` on the scheduler side, for tests that drive `SchedulerSide` without vLLM.

`SchedulerSide` reads only these fields of a request; `hash_block` > 0 fills `block_hashes` with one
32-byte value per full block, chained over the prefix as vLLM's hasher does (`update_block_hashes`
appends the hashes of new full blocks from the last one), so salting and unsalting can be checked.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field


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
