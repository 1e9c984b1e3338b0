"""Copy streams: device-to-host on one side stream, host-to-device prefetch on another.

On CUDA, offload copies run on a D2H stream that first waits for the compute stream (the
data must exist), and prefetches on an H2D stream; each batch of copies ends in an event,
and whoever reads the result makes ITS stream wait on that event (no host sync). Tensors a
side stream reads or writes are marked with record_stream so the caching allocator does not
hand their memory out again before the copy has run. On the CPU every copy is synchronous,
events are None and the same calls are no-ops, so the CPU tests run the real code path.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor


class CopyStreams:
    """The side streams of one device (no-ops on the CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.d2h = torch.cuda.Stream(device) if self.is_cuda else None
        self.h2d = torch.cuda.Stream(device) if self.is_cuda else None

    def offload(self) -> AbstractContextManager:
        """Context for D2H copies: the side stream first waits for the compute stream."""
        if self.d2h is None:
            return nullcontext()
        self.d2h.wait_stream(torch.cuda.current_stream(self.device))
        return torch.cuda.stream(self.d2h)

    def prefetch(self, after: torch.cuda.Event | None) -> AbstractContextManager:
        """Context for H2D copies, ordered after `after` (the D2H that filled the host data)."""
        if self.h2d is None:
            return nullcontext()
        if after is not None:
            self.h2d.wait_event(after)
        return torch.cuda.stream(self.h2d)

    def record(self) -> torch.cuda.Event | None:
        """An event at the current point of the current stream (None on the CPU)."""
        if not self.is_cuda:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def wait(self, event: torch.cuda.Event | None) -> None:
        """Make the current stream wait for `event`."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def used_by_side_stream(self, tensor: Tensor) -> None:
        """Keep tensor's memory from being reused until the side stream's work on it is done."""
        if self.is_cuda and tensor.device.type == "cuda":
            tensor.record_stream(torch.cuda.current_stream(self.device))
