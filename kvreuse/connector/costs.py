"""Reuse only where it pays: a per-placement cost model, learned online.

Placing `n` stored tokens saves their prefill, `n · prefill_s_per_token`, and costs their load,
`n · place_s_per_token`.  A placement in the middle of a prompt also costs one more scheduler step
(the computed gap after it needs its own forward pass): `step_overhead_s`.  A placement is made
when the saving exceeds the cost by `margin`, and never for fewer than `min_tokens` tokens.

The three rates start from the configured defaults and follow what the server measures: step
wall time against tokens scheduled (`observe_step`: short steps give the fixed overhead, long
ones the per-token prefill rate) and the workers' load time per placed token (`observe_load`).
"""

from __future__ import annotations

from dataclasses import dataclass

_ALPHA = 0.2  # weight of a new observation in the moving averages


@dataclass
class CostModel:
    prefill_s_per_token: float = 2e-4
    place_s_per_token: float = 1e-5
    step_overhead_s: float = 5e-3
    min_tokens: int = 16
    margin: float = 1.25
    learn: bool = True

    def pays(self, num_tokens: int, leading: bool) -> bool:
        """Whether placing `num_tokens` (at the prefix hit when `leading`) beats computing them."""
        if num_tokens < self.min_tokens:
            return False
        saved = num_tokens * self.prefill_s_per_token
        cost = num_tokens * self.place_s_per_token + (0.0 if leading else self.step_overhead_s)
        return saved > self.margin * cost

    def observe_step(self, seconds: float, num_tokens: int, num_reqs: int) -> None:
        """One scheduler step took `seconds` wall time for `num_tokens` tokens of `num_reqs` requests."""
        if not self.learn or seconds <= 0 or num_tokens <= 0:
            return
        if num_tokens <= 2 * max(num_reqs, 1):  # decode-like: mostly fixed cost
            self.step_overhead_s += _ALPHA * (seconds - self.step_overhead_s)
        elif num_tokens >= 64:
            per_tok = max(seconds - self.step_overhead_s, 0.0) / num_tokens
            self.prefill_s_per_token += _ALPHA * (per_tok - self.prefill_s_per_token)

    def observe_load(self, seconds: float, num_tokens: int) -> None:
        """Workers placed `num_tokens` tokens in `seconds`."""
        if self.learn and num_tokens > 0 and seconds >= 0:
            self.place_s_per_token += _ALPHA * (seconds / num_tokens - self.place_s_per_token)
