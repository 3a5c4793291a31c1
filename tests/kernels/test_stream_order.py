"""Saved KV handed from the forward's stream to the store's thread: the store reads it only once it is written.

The worker gathers a saved chunk's K/V on the forward's stream and hands the tensors to the store's
background thread (`ChunkStore.ingest_many`), which reads them on its own stream.  `ReadyAfter`
(`kvreuse.store.ready`) orders the two: the store's first op on them waits for an event recorded
after the gather.  The CPU test pins where the store waits (before its first read); the GPU test
runs the real race (the gather still queued behind a long kernel on another stream).
"""

from __future__ import annotations

import pytest
import torch

from kvreuse.store import ChunkKey, ChunkStore, ModelFingerprint, StoreConfig
from kvreuse.store.ingest import IngestChunk
from kvreuse.store.ready import ReadyAfter

FP = ModelFingerprint("TestArch", "weights-stream-order", "float32")
L, N, H, D = 3, 24, 2, 16


def _chunk(k: torch.Tensor, v: torch.Tensor, ready: ReadyAfter | None, seed: int = 0) -> IngestChunk:
    ids = list(range(100 + seed, 100 + seed + k.shape[1]))
    return IngestChunk(ChunkKey.of(FP, ids), ids, torch.arange(k.shape[1]), k, v, "isolated", ready=ready)


def test_cpu_tensors_need_no_event():
    assert ReadyAfter.record(torch.zeros(2), torch.ones(3)) is None


class _WrittenAtTheEvent(ReadyAfter):
    """The producer's writes land when the event fires (as a queued CUDA gather would): `wait` performs them."""

    def __init__(self, writes: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__(None, torch.device("cpu"))
        self.writes, self.waited_on = writes, []

    def wait(self, *tensors: torch.Tensor) -> None:
        self.waited_on.append(tensors)
        for dst, src in self.writes:
            dst.copy_(src)


def test_the_store_waits_for_the_producer_before_its_first_read():
    # k, v: slices of one gathered buffer, as the worker hands them over (not contiguous: the store copies them)
    buf_k, buf_v = torch.zeros(L, 2 * N, H, D), torch.zeros(L, 2 * N, H, D)
    final_k, final_v = torch.randn(L, 2 * N, H, D), torch.randn(L, 2 * N, H, D)
    k, v = buf_k[:, N:], buf_v[:, N:]
    assert not k.is_contiguous()
    ready = _WrittenAtTheEvent([(buf_k, final_k), (buf_v, final_v)])
    c = _chunk(k, v, ready)
    with ChunkStore(StoreConfig(host_bytes=1 << 24), FP) as store:
        assert store.ingest_many([c]) == [True]
        store.flush(30)
        got = store.get(c.key, c.token_ids)
    assert got is not None
    assert len(ready.waited_on) == 1
    assert ready.waited_on[0][0] is k and ready.waited_on[0][1] is v  # the tensors handed over, not a copy
    # read before the wait, the store would hold the zeros the buffer had when it was handed over
    assert torch.equal(got.k, final_k[:, N:]) and torch.equal(got.v, final_v[:, N:])


@pytest.mark.gpu
def test_gpu_store_reads_saved_kv_only_after_the_gather_on_the_forward_stream():
    dev = torch.device("cuda")
    forward = torch.cuda.Stream(dev)  # the forward's stream (not the store thread's default stream)
    src_k, src_v = torch.randn(L, 2 * N, H, D, device=dev), torch.randn(L, 2 * N, H, D, device=dev)
    torch.cuda.synchronize()
    with ChunkStore(StoreConfig(device_bytes=1 << 26), FP, device=dev) as store:
        chunks = []
        for seed in range(4):
            with torch.cuda.stream(forward):
                buf_k, buf_v = torch.zeros_like(src_k), torch.zeros_like(src_v)
                torch.cuda._sleep(200_000_000)  # the forward still busy: the gather below is long in the queue
                buf_k.copy_(src_k)
                buf_v.copy_(src_v)
                k, v = buf_k[:, N:], buf_v[:, N:]
                chunks.append(_chunk(k, v, ReadyAfter.record(k, v), seed))
            del buf_k, buf_v, k, v  # only the store holds them now: their memory must not go back to `forward`
        assert store.ingest_many(chunks) == [True] * len(chunks)
        store.flush(120)
        torch.cuda.synchronize()
        for c in chunks:
            got = store.get(c.key, c.token_ids)
            assert got is not None
            assert torch.equal(got.k.to(dev), src_k[:, N:]) and torch.equal(got.v.to(dev), src_v[:, N:])
