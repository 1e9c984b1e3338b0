"""Exact accounting of bytes saved for backward, per decoder layer.

A saved_tensors_hooks context records every tensor autograd saves, deduplicated by storage
(a view costs nothing beyond the storage it shares), and attributes each storage to the
decoder layer whose forward saved it. A storage saved by more than one layer (the shared RoPE
tables) is reported as shared. Parameters (linears save their weight) are not activations and
are left out. Activation policies that install their own hooks inside a
layer hide that layer's tensors from this ledger; measure those through the policy.
"""

from __future__ import annotations

from collections import defaultdict
from types import TracebackType

import torch
from torch import Tensor, nn

OUTSIDE = -1
"""Key for storages saved outside any decoder layer (embedding, final norm, loss)."""


class SavedTensorLedger:
    """Context manager: bytes saved for backward during the forward passes run inside one
    `with` block, by layer."""

    def __init__(self, model: nn.Module) -> None:
        self._current: list[int] = [OUTSIDE]
        self._owners: dict[int, set[int]] = defaultdict(set)
        self._sizes: dict[int, int] = {}
        self._keepalive: list[Tensor] = []  # keeps storages alive so pointers stay unique
        self._parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self._handles = []
        for module in model.modules():
            index = getattr(module, "layer_index", None)
            if index is None:
                continue
            self._handles.append(module.register_forward_pre_hook(self._enter_layer(index)))
            self._handles.append(module.register_forward_hook(self._leave_layer))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _enter_layer(self, index: int):
        def hook(_module: nn.Module, _args: object) -> None:
            self._current.append(index)

        return hook

    def _leave_layer(self, _module: nn.Module, _args: object, _out: object) -> None:
        self._current.pop()

    def _pack(self, tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self._parameter_storages:
            return tensor
        if storage.nbytes() and key not in self._sizes:
            self._sizes[key] = storage.nbytes()
            self._keepalive.append(tensor)
        if storage.nbytes():
            self._owners[key].add(self._current[-1])
        return tensor

    def __enter__(self) -> SavedTensorLedger:
        self._hooks.__enter__()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._hooks.__exit__(kind, exc, tb)
        for handle in self._handles:
            handle.remove()
        # the counts are kept; the saved tensors are released (the ledger would otherwise
        # hold them past backward: it sits in a reference cycle through its hooks)
        self._keepalive.clear()

    def per_layer_bytes(self) -> dict[int, int]:
        """Bytes first saved in, and only in, each layer (OUTSIDE for the rest of the model)."""
        totals: dict[int, int] = defaultdict(int)
        for key, owners in self._owners.items():
            if len(owners) == 1:
                totals[next(iter(owners))] += self._sizes[key]
        return dict(totals)

    def shared_bytes(self) -> int:
        """Bytes of storages saved by more than one layer (e.g. RoPE cos/sin)."""
        return sum(self._sizes[k] for k, owners in self._owners.items() if len(owners) > 1)

    def total_bytes(self) -> int:
        """All distinct saved storages."""
        return sum(self._sizes.values())
