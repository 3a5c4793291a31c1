"""What travels between the scheduler-side and worker-side connectors each step."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata

from kvreuse.connector.claim import LoadItem, SaveItem


@dataclass
class ReqLoad:
    """Place `items` (in order, contiguous from `items[0].dst_start`) into the request's blocks."""

    req_id: str
    block_ids: list[int]
    items: list[LoadItem]
    inject_failure: bool = False  # testing: fail this request's first load (needs allow_fault_injection)

    @property
    def end(self) -> int:
        last = self.items[-1]
        return last.dst_start + last.src_end - last.src_start


@dataclass
class ReqSave:
    """Read `items` out of the request's blocks (its prompt is computed by the end of this step)."""

    req_id: str
    block_ids: list[int]
    items: list[SaveItem]


@dataclass
class KVReuseMetadata(KVConnectorMetadata):
    loads: list[ReqLoad] = field(default_factory=list)
    saves: list[ReqSave] = field(default_factory=list)


@dataclass
class KVReuseWorkerReport(KVConnectorWorkerMetadata):
    """Keys the scheduler must forget: a put was refused, or a claimed load failed."""

    lost_keys: list[bytes] = field(default_factory=list)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> "KVReuseWorkerReport":
        assert isinstance(other, KVReuseWorkerReport)
        return KVReuseWorkerReport(self.lost_keys + other.lost_keys)
