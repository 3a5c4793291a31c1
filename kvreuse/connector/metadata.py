"""What travels between the scheduler-side and worker-side connectors each step."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata

from kvreuse.connector.claim import LoadItem, SaveItem


@dataclass
class ReqLoad:
    """Place `items` into the request's blocks, each at its own `dst_start` (any set of chunks, in
    prompt order: a step may place several segments of one prompt).

    `fidelity`: the request's (`kvreuse.connector.fidelity`); the worker fails a load it could serve
    only from KV that fidelity refuses, and an exact claim it could serve only from other KV (vLLM
    caches exact claims under plain block hashes), and vLLM recomputes it.
    """

    req_id: str
    block_ids: list[int]
    items: list[LoadItem]
    inject_failure: bool = False  # testing: fail this request's first load (needs allow_fault_injection)
    fidelity: str = "exact"

    @property
    def end(self) -> int:
        """One past the last position any item fills."""
        return max(it.dst_start + it.src_end - it.src_start for it in self.items)


@dataclass
class ReqSave:
    """Read `items` out of the request's blocks (its prompt is computed by the end of this step)."""

    req_id: str
    block_ids: list[int]
    items: list[SaveItem]


@dataclass
class KVReuseMetadata(KVConnectorMetadata):
    """One step's loads and saves.  `fresh_blocks`: the blocks this step allocates (new requests' and new
    blocks of running ones: the only blocks vLLM zeroes or writes beyond their unwritten slots), so that
    a copy-out still reading older blocks need not be waited for; None (built outside vLLM's scheduler):
    unknown, every copy-out is waited for."""

    loads: list[ReqLoad] = field(default_factory=list)
    saves: list[ReqSave] = field(default_factory=list)
    fresh_blocks: list[int] | None = None


@dataclass
class KVReuseWorkerReport(KVConnectorWorkerMetadata):
    """What the scheduler's directory and save planning must hear from the workers.

    lost_keys: chunks the store no longer holds (evicted from its last tier, refused, dropped
        from a full ingest queue) or whose claimed load failed: forget them.
    demoted_keys: chunks whose in-context KV was dropped under pressure (base + patches remain).
    unsaved_req_ids: requests whose save this step was skipped because one of their loads failed
        (what the step computed attended to blocks never written): save them after the recompute.
    failed_req_ids: requests whose load failed this step, on any rank (the union over ranks is
        what is counted in `kvreuse_load_failures_total`: once per request, however many ranks failed).
    """

    lost_keys: list[bytes] = field(default_factory=list)
    demoted_keys: list[bytes] = field(default_factory=list)
    unsaved_req_ids: list[str] = field(default_factory=list)
    load_seconds: float = 0.0   # time spent placing `load_tokens` tokens (ranks place in parallel: the slowest)
    load_tokens: int = 0
    failed_req_ids: list[str] = field(default_factory=list)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> "KVReuseWorkerReport":
        assert isinstance(other, KVReuseWorkerReport)
        return KVReuseWorkerReport(self.lost_keys + other.lost_keys, self.demoted_keys + other.demoted_keys,
                                   list(dict.fromkeys(self.unsaved_req_ids + other.unsaved_req_ids)),
                                   max(self.load_seconds, other.load_seconds), max(self.load_tokens, other.load_tokens),
                                   list(dict.fromkeys(self.failed_req_ids + other.failed_req_ids)))
