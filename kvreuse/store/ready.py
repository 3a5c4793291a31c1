"""Ordering of tensors one thread produces on its CUDA stream and another thread reads.

A CUDA op returns before it has run.  The worker gathers saved chunks out of the paged cache on the
forward's stream and hands the tensors to the store, whose thread reads them on its own current
stream: without ordering, that read may run before the gather has written them.  And once the store
drops a tensor, the caching allocator hands its memory back to the stream that allocated it (the
forward's), which may overwrite it while the store's stream still reads it.

`ReadyAfter.record` (producer, right after the last op that writes the tensors) records a CUDA event
on the producer's current stream; `ReadyAfter.wait` (consumer, before its first op on them) makes the
consumer's current stream wait for that event and marks the tensors as in use by that stream
(`Tensor.record_stream`), so their memory is not reused before the consumer's ops have run.  CPU
tensors need neither: a CPU op has finished when it returns, and the hand-over (the store's queue,
under a lock) orders the threads.
"""

from __future__ import annotations

import torch


class ReadyAfter:
    """A CUDA event recorded on the stream that produced some tensors; another thread waits on it."""

    __slots__ = ("event", "device")

    def __init__(self, event: "torch.cuda.Event", device: torch.device) -> None:
        self.event, self.device = event, device

    @classmethod
    def record(cls, *tensors: torch.Tensor) -> "ReadyAfter | None":
        """After the last op writing `tensors` on this thread's current stream; None where none is on CUDA."""
        device = next((t.device for t in tensors if t.is_cuda), None)
        if device is None:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        return cls(event, device)

    def wait(self, *tensors: torch.Tensor) -> None:
        """Before this thread's first op on `tensors`: its current stream waits for the producer's event, and
        the tensors' memory stays theirs until this stream's ops on them have run (CUDA tensors only)."""
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(self.event)
        for t in tensors:
            if t.is_cuda:
                t.record_stream(stream)
