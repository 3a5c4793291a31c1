"""A request's state on the scheduler side: what is known of its prompt, and where its prefill stands.

::

    WAITING ──matched──► PLANNED ──after_alloc──► PREFILL ──prompt computed──► SAVED
       ▲   ◄─┐             │ (matched again: re-planned)   ▲    │                  │
       │     └─────────────┘                               └────┘ unsaved          │
       └──────────────────────── preempted (from any of them) ◄────────────────────┘
    OFF: served without kvreuse (opted out, M-RoPE positions or adapter files unresolved).

`to` is the only place a phase changes, and it checks the transition.  What a (re)plan sets up —
the placements still to take, those taken, the keys they filled — lives in `Prefill` and is
replaced whole on every plan and on preemption, so no field of an old plan outlives it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

from kvreuse.connector.fidelity import RequestOptions
from kvreuse.connector.plan import Placement, Plan
from kvreuse.connector.segment import Anchors, Chunk


class Phase(enum.Enum):
    WAITING = "waiting"    # keys known, nothing planned (new, or preempted)
    PLANNED = "planned"    # placements planned by `matched`; vLLM has not allocated the blocks yet
    PREFILL = "prefill"    # blocks allocated: placements taken as the prefill reaches them, gaps computed
    SAVED = "saved"        # the prompt is computed and its saves handed to the worker
    OFF = "off"            # served without kvreuse


_NEXT = {
    Phase.WAITING: {Phase.PLANNED, Phase.PREFILL, Phase.OFF},
    Phase.PLANNED: {Phase.PLANNED, Phase.PREFILL, Phase.WAITING},
    Phase.PREFILL: {Phase.SAVED, Phase.WAITING},
    Phase.SAVED: {Phase.PREFILL, Phase.WAITING},   # a dropped save is planned again; preemption
    Phase.OFF: set(),
}


@dataclass
class Prefill:
    """One plan's progress (replaced whole on every plan)."""

    plan: Plan | None = None
    starts: list[int] = field(default_factory=list)           # placement starts (bisect for `cap`)
    next_seg: int = 0                                          # first placement not advanced over yet
    load_pending: bool = False                                 # the leading placement, claimed through vLLM
    pending: list[Placement] = field(default_factory=list)    # advanced over, not yet sent to the worker
    used: list[Placement] = field(default_factory=list)       # placements taken, in order (as served)

    @classmethod
    def of(cls, plan: Plan) -> "Prefill":
        return cls(plan, [p.start for p in plan.placements])


@dataclass
class RequestState:
    request: Any
    chunks: list[Chunk]
    keys: list[bytes]
    anchors: Anchors
    ns: bytes                              # chunk namespace (model, salt, adapter): what edge fill may use
    opts: RequestOptions                   # parsed once from kv_transfer_params
    positions: torch.Tensor | None = None  # M-RoPE: [3, N] from the model's get_mrope_input_positions
    seen: list[bool] | None = None         # per chunk: seen in an earlier prompt (adaptive admission)
    phase: Phase = Phase.WAITING
    prefill: Prefill = field(default_factory=Prefill)
    recorded: list = field(default_factory=list)  # the save items recorded in the directory for the last save
    ever_saved: bool = False               # saved once: a request resumed after preemption is not saved again
    counted: bool = False                  # lookups counted (once a request)
    segments_counted: bool = False
    salted_from: int | None = None         # first salted block index

    def to(self, phase: Phase) -> None:
        assert phase in _NEXT[self.phase], f"request {self.request.request_id}: {self.phase.value} -> {phase.value}"
        self.phase = phase

    def replan(self, plan: Plan) -> None:
        self.to(Phase.PLANNED)
        self.prefill = Prefill.of(plan)

    def reset(self) -> None:
        """Preempted: its blocks are gone, so is whatever its plan placed."""
        if self.phase is not Phase.OFF:
            if self.phase is not Phase.WAITING:
                self.to(Phase.WAITING)
            self.prefill = Prefill()

    # the current plan's progress, read where the scheduler side and tests name it
    @property
    def plan(self) -> Plan | None:
        return self.prefill.plan

    @property
    def used(self) -> list[Placement]:
        return self.prefill.used

    @property
    def placed(self) -> set[bytes]:
        """Chunks the placements taken fill (never saved as computed)."""
        return {k for p in self.prefill.used for k in p.keys}

    def approximate_from(self) -> int | None:
        """First prompt position holding approximate KV this request was served (None: all exact so far)."""
        return min((it.dst_start for p in self.prefill.used for it in p.items if it.policy != "exact"), default=None)

    def provenance(self) -> dict[str, int]:
        """Placed prompt tokens by provenance, as served (failed loads rolled back)."""
        out = {"exact": 0, "approximate": 0}
        for p in self.prefill.used:
            for it in p.items:
                out["exact" if it.policy == "exact" else "approximate"] += it.num_tokens
        return out
