"""Stand-ins for vLLM's `Request` on the scheduler side, for tests that drive `SchedulerSide` without vLLM.

`SchedulerSide` reads only these fields of a request; `hash_block` > 0 fills `block_hashes` with one
distinct 32-byte value per full block (what vLLM's hasher would append), so salting can be checked.
"""

from __future__ import annotations

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
        if self.hash_block:
            self.block_hashes = [bytes([i % 256]) * 32 for i in range(len(self.prompt_token_ids) // self.hash_block)]


def message(seed: int, n: int, start: int = 2) -> list[int]:
    """One message: a boundary token `start`, then n seeded tokens."""
    rng = random.Random(seed)
    return [start] + [rng.randrange(10, 500) for _ in range(n)]
