"""Fidelity and provenance: what KV a request may be served, decided once per request.

Two kinds of KV leave the store (DESIGN.md, "Fidelity and provenance"):
  exact        bit for bit what vLLM computes: a chunk placed after the very chunks it was computed
               after, in a request where nothing before it was approximate;
  approximate  everything else: survival, reorder, recall and blind placements, and any KV computed
               after approximate KV (a save downstream of one is recorded under a *tainted* context
               signature, so no later plan can call it exact).

A server's `policy.fidelity` says which a request may be served; a request may tighten it
(`kv_transfer_params: {"kvreuse": {"fidelity": "exact"}}`), never loosen it:
  exact     only exact placements (the default: the answers vLLM alone gives);
  accurate  approximate placements too, repaired: the first `policy.repair_tokens` tokens after each
            change point (where placed KV stops following what it was stored after) are computed in
            place (`plan.plan_segments`);
  fast      approximate placements unrepaired.
Blocks from a request's first approximate position on are cached by vLLM under block hashes salted
with the request's fidelity (`salt`), so vLLM's prefix cache serves them only to a request of the
same fidelity whose own plan turned approximate at the same block, never under plain hashes.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import xxhash

from kvreuse.connector.config import FIDELITY_LEVELS

log = logging.getLogger("kvreuse.connector")

# What the looser levels cost in answers, measured by bench/fidelity_bench.py on SmolLM2-135M-Instruct (bf16,
# seven workloads of 40 requests each, bench/results/fidelity_*.json); logged once when a server starts at that level.
MEASURED_LOSS = {
    "fast": ("kvreuse: policy.fidelity \"fast\" places approximate KV unrepaired: on SmolLM2-135M-Instruct it kept "
             "30-90% of vLLM alone's greedy answers (RAG 30%) and lost up to 16 points of accuracy (raw-text "
             "sliding window 62% vs 78%, RAG 57% vs 72%); \"exact\" keeps every answer (bench/fidelity_bench.py)"),
    "accurate": ("kvreuse: policy.fidelity \"accurate\" places approximate KV with its first tokens recomputed: on "
                 "SmolLM2-135M-Instruct it kept 48-100% of vLLM alone's greedy answers; accuracy within 5 points on "
                 "five of seven workloads, 12 and 16 points lower on reordered passage sets and a raw-text sliding "
                 "window; \"exact\" keeps every answer "
                 "(bench/fidelity_bench.py)"),
}

_SALT = b"kvreuse-approximate-kv:"
_TAINT = b"kvreuse-after-approximate-kv"


@dataclass(frozen=True)
class RequestOptions:
    """A request's kvreuse settings, parsed once from its `kv_transfer_params`."""

    enabled: bool = True          # False: `{"kvreuse": false}` / `{"kvreuse": {"enabled": false}}` / "off"
    fidelity: str = "exact"       # the server's level, tightened by the request's own
    inject_failure: bool = False  # testing: fail this request's first load (needs allow_fault_injection)

    @classmethod
    def parse(cls, kv_transfer_params: dict[str, Any] | None, server_fidelity: str,
              allow_fault_injection: bool = False) -> "RequestOptions":
        v = (kv_transfer_params or {}).get("kvreuse")
        if v is None or v is True:
            return cls(True, server_fidelity)
        if v is False or v == "off":
            return cls(False, server_fidelity)
        if not isinstance(v, dict):  # malformed: served the strictest way, never a looser one than asked
            log.warning("kvreuse: kv_transfer_params.kvreuse %r is not true, false, \"off\" or an object; served "
                        "\"exact\"", v)
            return cls(True, "exact")
        unknown = sorted(set(v) - _OPTION_KEYS)
        if unknown:
            log.warning("kvreuse: unknown kv_transfer_params.kvreuse keys %s (known: %s); ignored", unknown,
                        ", ".join(sorted(_OPTION_KEYS)))
        enabled = v.get("enabled", True)
        if not isinstance(enabled, bool):
            log.warning("kvreuse: kv_transfer_params.kvreuse.enabled %r is not true or false; served without "
                        "kvreuse", enabled)
            enabled = False
        fidelity = tighter(server_fidelity, v.get("fidelity", server_fidelity))
        inject = allow_fault_injection and bool(v.get("inject_load_failure"))
        return cls(enabled, fidelity, inject)


_OPTION_KEYS = frozenset({"enabled", "fidelity", "inject_load_failure"})


def tighter(server: str, asked: Any) -> str:
    """The stricter of the server's level and a request's; an unknown level asked for is the strictest."""
    if asked not in FIDELITY_LEVELS:
        log.warning("kvreuse: request asked for fidelity %r (known: %s); served \"exact\"", asked,
                    ", ".join(FIDELITY_LEVELS))
        return "exact"
    return FIDELITY_LEVELS[min(FIDELITY_LEVELS.index(server), FIDELITY_LEVELS.index(asked))]


def allows(fidelity: str, policy: str) -> bool:
    """Whether a request of `fidelity` may be served KV placed under `policy`."""
    return policy == "exact" or fidelity != "exact"


def repairs(fidelity: str) -> bool:
    """Whether approximate placements are repaired (their context-sensitive first tokens recomputed)."""
    return fidelity == "accurate"


def salted(block_hash: bytes, fidelity: str) -> bytes:
    """The block hash vLLM caches a block under once it holds (or follows) approximate KV of `fidelity`."""
    return hashlib.sha256(_SALT + fidelity.encode() + block_hash).digest()[:len(block_hash)]


def tainted(signature: bytes) -> bytes:
    """The context signature of KV computed after approximate KV: never equal to a plain one."""
    return xxhash.xxh3_128(_TAINT + signature).digest()
