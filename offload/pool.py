"""Host memory for offloaded activations, allocated once and reused every step.

Each decoder layer's forward needs one slab of host memory per micro-batch in flight: the
offloaded token slices of its activations and anchors, packed back to back (ALIGN_BYTES
apart). The slab's size depends only on shapes and the layer's policy, so the sizes requested
in step 2 are exactly those of step 1 and a best-fit free list serves every later step without
allocating. `reserve` preallocates from the plan, so even step 1 allocates nothing.

On CUDA the slabs are pinned (page-locked) so copies run asynchronously on side streams; a
slab goes back to the free list with the event of the last copy that reads it, and the next
user waits on that event on its own stream (never on the host). Pinned memory needs an
accelerator: on CPU-only torch the slabs are ordinary tensors and events are None.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

ALIGN_BYTES = 256
"""Every offloaded piece starts at a multiple of this inside its slab."""


def align_up(nbytes: int) -> int:
    """nbytes rounded up to a multiple of ALIGN_BYTES."""
    return -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES


def allocate_host_buffer(nbytes: int, pin_memory: bool) -> Tensor:
    """The one place host slabs are allocated (tests count calls to it)."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin_memory)


@dataclass
class _FreeSlab:
    buffer: Tensor
    ready: torch.cuda.Event | None
    """Event of the last copy reading or writing the slab; users wait on it first."""


class HostBufferPool:
    """Host slabs for offloaded activations, reused across steps (pinned when CUDA exists).

    A slab of capacity C serves a request of n bytes when n <= C <= n + max(n / 16, 1 MiB):
    reuse after step 1 is exact, and a reservation made from the plan's predictions (which
    leave out alignment padding) still fits.
    """

    def __init__(self, pin_memory: bool | None = None) -> None:
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._free: list[_FreeSlab] = []
        self._lock = threading.Lock()
        self.allocations = 0
        """Slabs allocated so far (never decreases; the training loop should stop adding)."""
        self.allocated_bytes = 0
        """Host bytes held by the pool, in use or free."""
        self.in_use_bytes = 0
        """Capacity of the slabs currently leased out."""

    def _allocate(self, capacity: int) -> Tensor:
        buffer = allocate_host_buffer(capacity, self.pin_memory)
        self.allocations += 1
        self.allocated_bytes += capacity
        return buffer

    def reserve(self, capacities: Iterable[int]) -> None:
        """Allocate slabs now (before the training loop), e.g. one per layer and micro-batch
        in flight, sized from the plan's predicted host bytes."""
        with self._lock:
            for capacity in capacities:
                if capacity > 0:
                    self._free.append(_FreeSlab(self._allocate(align_up(capacity)), None))

    def acquire(self, nbytes: int) -> tuple[Tensor, torch.cuda.Event | None]:
        """A slab of at least nbytes and the event to wait on before writing to it."""
        slack = max(nbytes // 16, 2**20)
        with self._lock:
            best: int | None = None
            for position, slab in enumerate(self._free):
                capacity = slab.buffer.numel()
                if nbytes <= capacity <= nbytes + slack and (
                    best is None or capacity < self._free[best].buffer.numel()
                ):
                    best = position
            if best is not None:
                slab = self._free.pop(best)
                buffer, ready = slab.buffer, slab.ready
            else:
                buffer, ready = self._allocate(align_up(nbytes)), None
            self.in_use_bytes += buffer.numel()
            return buffer, ready

    def release(self, buffer: Tensor, ready: torch.cuda.Event | None) -> None:
        """Give a slab back; `ready` is the event of the last copy that touches it."""
        with self._lock:
            self.in_use_bytes -= buffer.numel()
            self._free.append(_FreeSlab(buffer, ready))

    def clear(self) -> None:
        """Drop the free slabs (leased ones return when their users are done)."""
        with self._lock:
            for slab in self._free:
                self.allocated_bytes -= slab.buffer.numel()
            self._free.clear()


class SlabLease:
    """One layer forward's slab; returned to the pool when the last record using it dies."""

    def __init__(self, pool: HostBufferPool, nbytes: int) -> None:
        self.pool = pool
        self.buffer, self.ready = pool.acquire(nbytes)
        self.last_event: torch.cuda.Event | None = None
        """Event of the latest copy out of (or into) the slab."""

    def piece(self, offset: int, nbytes: int, dtype: torch.dtype) -> Tensor:
        """A 1-D `dtype` view of nbytes of the slab at offset (a multiple of ALIGN_BYTES)."""
        return self.buffer[offset : offset + nbytes].view(dtype)

    def __del__(self) -> None:
        # at interpreter shutdown the pool may already be gone
        with contextlib.suppress(Exception):
            self.pool.release(self.buffer, self.last_event)
