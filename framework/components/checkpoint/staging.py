"""Lazy snapshots (DataStates-LLM): copy a state dict to reused host buffers while training
goes on, and make the next write to the originals wait only if that copy is not finished.

Parameters and optimizer state change only in the optimizer step. So a snapshot taken right
after step N is started here and runs during step N+1's forward and backward:
- CUDA tensors: non_blocking copies into pinned buffers on a side stream; the pre-update wait
  makes the compute stream wait for that stream (the host does not block).
- CPU tensors: copied by a helper thread (tensor copies release the GIL); the pre-update wait
  joins it.
Buffers are allocated on the first snapshot and reused while shapes stay the same.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

# A state dict: nested dicts / lists / tuples whose leaves are tensors or plain values.
StateDict = dict[str, Any]


def _map_tree(tree: Any, leaf: Callable[[str, Any], Any], path: str = "") -> Any:
    if isinstance(tree, dict):
        return {key: _map_tree(value, leaf, f"{path}/{key}") for key, value in tree.items()}
    if isinstance(tree, list | tuple):
        mapped = [_map_tree(value, leaf, f"{path}/{i}") for i, value in enumerate(tree)]
        return type(tree)(mapped)
    return leaf(path, tree)


def state_bytes(tree: Any) -> int:
    """Bytes of the tensors in a state dict (this rank's shards)."""
    total = 0

    def add(_: str, value: Any) -> None:
        nonlocal total
        if isinstance(value, Tensor):
            local = value.to_local() if isinstance(value, DTensor) else value
            total += local.numel() * local.element_size()

    _map_tree(tree, add)
    return total


def _copy_one_thread(dst: Tensor, src: Tensor) -> None:
    """dst <- src as one memcpy on this thread. Tensor.copy_ would fan out to the intra-op
    thread pool, competing with the training thread's own on a few cores; NumPy copies
    without the GIL."""
    if dst.is_contiguous() and src.is_contiguous() and dst.dtype == src.dtype and src.numel():
        np.copyto(dst.view(-1).view(torch.uint8).numpy(), src.view(-1).view(torch.uint8).numpy())
    else:
        dst.copy_(src)


class HostSnapshot:
    """Reusable host copies of a state dict, filled asynchronously.

    stage() returns a state dict of the same structure whose tensors are host buffers (a
    DTensor keeps its sharding spec around a host local shard, so the checkpoint stays
    sharded). wait_for_source_writes() (training thread) must run before the originals are
    modified; wait_ready() (the persisting thread) before the host copy is read.
    """

    def __init__(self, pin_memory: bool) -> None:
        self.pin_memory = pin_memory
        self._buffers: dict[str, Tensor] = {}
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._events: dict[torch.device, torch.cuda.Event] = {}
        self._cpu_done = threading.Event()
        self._cpu_done.set()
        self._cpu_error: BaseException | None = None
        self._sources: list[Tensor] = []  # kept alive until their copies are done

    @property
    def num_bytes(self) -> int:
        """Host bytes held by the reused buffers."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def _buffer(self, path: str, local: Tensor) -> Tensor:
        buffer = self._buffers.get(path)
        if buffer is None or buffer.shape != local.shape or buffer.dtype != local.dtype:
            # Own storage per tensor: DCP clones any tensor whose storage is larger than it.
            buffer = torch.empty(local.shape, dtype=local.dtype, pin_memory=self.pin_memory)
            self._buffers[path] = buffer
        return buffer

    def stage(self, state: StateDict) -> StateDict:
        """Start copying `state` into the host buffers; returns the host state dict.

        The caller must not stage again before the previous host copy was consumed.
        """
        self.wait_for_source_writes()
        cpu_pairs: list[tuple[Tensor, Tensor]] = []
        device_pairs: dict[torch.device, list[tuple[Tensor, Tensor]]] = {}

        def host_leaf(path: str, value: Any) -> Any:
            if not isinstance(value, Tensor):
                return copy.deepcopy(value)  # e.g. lr in param_groups changes every step
            local = value.to_local() if isinstance(value, DTensor) else value
            local = local.detach()
            buffer = self._buffer(path, local)
            self._sources.append(local)
            if local.device.type == "cpu":
                cpu_pairs.append((buffer, local))
            else:
                device_pairs.setdefault(local.device, []).append((buffer, local))
            if isinstance(value, DTensor):
                return DTensor(buffer, value._spec, requires_grad=False)
            return buffer

        host_state = _map_tree(state, host_leaf)
        self._events = {}
        for device, pairs in device_pairs.items():
            stream = self._streams.setdefault(device, torch.cuda.Stream(device))
            stream.wait_stream(torch.cuda.current_stream(device))  # the sources are final
            with torch.cuda.stream(stream):
                for buffer, source in pairs:
                    buffer.copy_(source, non_blocking=True)
                    source.record_stream(stream)
                event = torch.cuda.Event()
                event.record(stream)
            self._events[device] = event
        if cpu_pairs:
            self._cpu_done.clear()
            self._cpu_error = None
            threading.Thread(
                target=self._copy_cpu, args=(cpu_pairs,), name="memplan-ckpt-stage", daemon=True
            ).start()
        return host_state

    def _copy_cpu(self, pairs: list[tuple[Tensor, Tensor]]) -> None:
        try:
            for buffer, source in pairs:
                _copy_one_thread(buffer, source)
        except BaseException as exc:  # reported by wait_ready() in the persisting thread
            self._cpu_error = exc
        finally:
            self._cpu_done.set()

    def wait_for_source_writes(self) -> None:
        """Before the originals change (the optimizer step): the copies must have read them.

        Blocks the host only while CPU sources are still being copied; for CUDA sources the
        current stream waits for the copy stream.
        """
        if not self._sources:
            return
        self._cpu_done.wait()
        for device, event in self._events.items():
            torch.cuda.current_stream(device).wait_event(event)
        self._sources = []

    def wait_ready(self) -> None:
        """Block until the host buffers hold the complete snapshot (raises if a copy failed)."""
        self._cpu_done.wait()
        for event in self._events.values():
            event.synchronize()
        if self._cpu_error is not None:
            raise RuntimeError("copying the checkpoint snapshot failed") from self._cpu_error
