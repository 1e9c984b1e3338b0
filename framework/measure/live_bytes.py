"""Peak memory where there is no CUDA allocator to ask: the CPU stand-in for
torch.cuda.max_memory_allocated.

    with LiveBytes() as tracker:
        ... training steps ...
    tracker.peak["device"], tracker.peak["host"]

LiveBytes counts every storage an aten op creates while it is active until that storage dies;
storages created inside `tracker.host()` (save_on_cpu's copies, host slabs) count as host
memory. Tensors alive before it started (parameters, optimizer states) are not seen: add them.
Kernels' internal scratch buffers (never visible as op outputs) are not seen either.

HostTaggedPool and HostSaved make the two host-memory policies visible to it on the CPU.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from offload import HostBufferPool


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created by aten ops while active and still alive, and their
    peak, split into device and host (storages created inside `host()`)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = {"device": 0, "host": 0}
        self.peak = {"device": 0, "host": 0}
        self._sizes: dict[int, int] = {}
        self._host_depth = 0

    @contextlib.contextmanager
    def host(self) -> Iterator[None]:
        """Storages created in here are host memory."""
        self._host_depth += 1
        try:
            yield
        finally:
            self._host_depth -= 1

    def _release(self, key: int, kind: str, size: int) -> None:
        self._sizes.pop(key, None)
        self.live[kind] -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        inputs = {
            id(t.untyped_storage())
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, Tensor)
        }
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, Tensor):
                continue
            storage = tensor.untyped_storage()
            key, size = id(storage), storage.nbytes()
            if key in inputs or key in self._sizes or size == 0:
                continue  # a view, an in-place result or a storage seen before
            kind = "host" if self._host_depth else "device"
            self._sizes[key] = size
            self.live[kind] += size
            self.peak[kind] = max(self.peak[kind], self.live[kind])
            weakref.finalize(storage, self._release, key, kind, size)
        return out


class HostTaggedPool(HostBufferPool):
    """A host pool whose slabs `tracker` counts as host memory (the CPU emulation)."""

    def __init__(self, tracker: LiveBytes | None = None) -> None:
        super().__init__(pin_memory=False)
        self.tracker = tracker

    def _allocate(self, capacity: int) -> Tensor:
        if self.tracker is None:
            return super()._allocate(capacity)
        with self.tracker.host():
            return super()._allocate(capacity)


class HostSaved(torch.autograd.graph.saved_tensors_hooks):
    """The save_on_cpu policy, counting the bytes it moves to the host in counter[0].

    CUDA: torch.autograd.graph.save_on_cpu(pin_memory=True) itself. CPU: torch's hooks are a
    no-op there (tensor.cpu() returns the tensor), so the emulation does what they do on a
    GPU: pack copies the tensor into host memory (a clone `tracker` counts as host) and
    lets the device storage go; unpack copies it back onto the device for backward.
    """

    def __init__(
        self,
        device: torch.device,
        tracker: LiveBytes | None,
        counter: list[int],
    ) -> None:
        if device.type == "cuda":
            inner = torch.autograd.graph.save_on_cpu(pin_memory=True)
            pack, unpack = inner.pack_hook, inner.unpack_hook
        else:

            def pack(tensor: Tensor) -> Tensor:
                with tracker.host() if tracker is not None else contextlib.nullcontext():
                    return tensor.clone()

            def unpack(host: Tensor) -> Tensor:
                return host.clone()

        def counted_pack(tensor: Tensor) -> Any:
            counter[0] += tensor.numel() * tensor.element_size()
            return pack(tensor)

        super().__init__(counted_pack, unpack)
