"""Apply per-layer activation policies from a plan to a model's decoder layers.

Order in the parallelisation pipeline (parallel/parallelize.py): tensor/sequence parallel ->
activation policy -> compile -> ZeRO. The engine only sets two plain attributes on each layer
(`activation_policy`, `cheap_op_runner`) and installs saved-tensor hooks during its forward:
no module wrapping, no state_dict key changes, so FSDP2, TP and pipeline stages compose.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from configs.schema import ModelConfig
from offload.engine import LayerActivationEngine, LayerActivationStats, LayerForward, make_pool
from offload.pool import ALIGN_BYTES, HostBufferPool, SlabLease, align_up
from offload.records import SharedTableRecord, StorageKey
from offload.streams import CopyStreams
from planner.activations import LayerShape, layer_activation_bytes
from planner.costs import dtype_bytes
from planner.plan import LayerPlan, Plan

logger = logging.getLogger(__name__)


class ActivationRuntime:
    """What the layers of one model share: the host pool, the copy streams, the prefetch
    chain (which layer forward comes before which) and the per-layer measurements."""

    def __init__(self, pool: HostBufferPool | None = None, fetch: str = "prefetch") -> None:
        if fetch not in ("prefetch", "on_demand"):
            raise ValueError(f"fetch must be 'prefetch' or 'on_demand', got {fetch!r}")
        self.pool = pool
        self.on_demand = fetch == "on_demand"
        """layout.activation_fetch: host data comes back tensor by tensor, nothing ahead."""
        self._streams: dict[torch.device, CopyStreams] = {}
        self._last: weakref.ref[LayerForward] | None = None
        self.engines: dict[int, LayerActivationEngine] = {}
        """Engines by layer index."""
        self._tables: dict[StorageKey, tuple[weakref.ref[torch.Tensor], SharedTableRecord]] = {}
        """Fetching on demand: the shared tables' host copies, by the device table."""
        self._layers: list[weakref.ref[nn.Module]] = []

    def shared_table(
        self, table: torch.Tensor, key: StorageKey, streams: CopyStreams, pool: HostBufferPool
    ) -> SharedTableRecord:
        """The host copy of a table every layer of this forward saves (fetching on demand):
        made by the first layer that sees it, reused by the others while the table lives.
        key: the table's storage identity (the engine's offload.engine.storage_key)."""
        known = self._tables.get(key)
        if known is not None and known[0]() is table:
            return known[1]
        # the copies of tables that died (an earlier step's) go back to the pool first, so
        # that this one reuses their slab
        self._tables = {k: v for k, v in self._tables.items() if v[0]() is not None}
        lease = SlabLease(pool, align_up(table.untyped_storage().nbytes()))
        record = SharedTableRecord(table, lease, streams)
        self._tables[key] = (weakref.ref(table), record)
        return record

    def table_buffers(self) -> list[torch.Tensor]:
        """The host slabs the shared tables' copies hold now (leased from the pool)."""
        return [record.lease.buffer for _, record in self._tables.values()]

    def resources(self, device: torch.device) -> tuple[CopyStreams, HostBufferPool]:
        """Copy streams and the host pool for `device` (created on first use)."""
        if device not in self._streams:
            self._streams[device] = CopyStreams(device)
        if self.pool is None:
            self.pool = make_pool(device)
        return self._streams[device], self.pool

    def link(self, forward: LayerForward, position: int) -> None:
        """Chain `forward` after the previous layer's forward of the same micro-batch, so
        that its backward prefetches that layer's host data one layer ahead."""
        last = self._last() if self._last is not None else None
        if last is not None and last.engine.position == position - 1 and not last.backward_started:
            forward.prev = last
        self._last = weakref.ref(forward)

    def layer_stats(self) -> dict[int, LayerActivationStats]:
        """Measurements of each layer's latest forward, by layer index."""
        return {
            index: engine.last_stats
            for index, engine in self.engines.items()
            if engine.last_stats is not None
        }

    def shared_bytes(self) -> int:
        """Bytes of the storages the layers' latest forwards saved without owning them (the
        RoPE tables, one pair for all layers): activations outside any one layer."""
        shared: dict[object, int] = {}
        for engine in self.engines.values():
            shared.update(engine.last_shared)
        return sum(shared.values())

    def remove(self) -> None:
        """Take the policies off every layer this runtime was applied to."""
        for ref in self._layers:
            layer = ref()
            if layer is not None:
                remove_activation_policy(layer)
        self._layers.clear()
        self.engines.clear()


def apply_activation_policy(
    layer: nn.Module,
    policy: LayerPlan,
    pool: HostBufferPool | None = None,
    *,
    runtime: ActivationRuntime | None = None,
    position: int | None = None,
    sequence_parallel: int = 1,
) -> LayerActivationEngine:
    """Make `layer` (a framework.components.model.DecoderLayer) keep/offload/recompute per `policy`.

    pool: host slabs (shared by the layers of a runtime; None: the runtime's, created on
    first use). runtime: shared state of the model's layers (None: a private one).
    position: the layer's place in forward order (default: its layer_index).
    sequence_parallel: the Ulysses degree (the attention core sees seq x sp tokens).
    """
    if not hasattr(layer, "activation_policy") or not hasattr(layer, "cheap_op_runner"):
        raise TypeError(f"{type(layer).__name__} has no activation_policy/cheap_op_runner seam")
    if runtime is None:
        runtime = ActivationRuntime(pool)
    elif pool is not None and runtime.pool is not pool:
        raise ValueError("pass the pool to the ActivationRuntime, not to each layer")
    index = int(getattr(layer, "layer_index", policy.index))
    if index != policy.index:
        raise ValueError(f"policy for layer {policy.index} applied to layer {index}")
    engine = LayerActivationEngine(
        policy, runtime, index if position is None else position, sequence_parallel
    )
    layer.activation_policy = engine
    layer.cheap_op_runner = engine.run_cheap_op
    runtime.engines[index] = engine
    runtime._layers.append(weakref.ref(layer))
    return engine


def apply_activation_plan(
    layers: Iterable[nn.Module],
    policies: Sequence[LayerPlan],
    pool: HostBufferPool | None = None,
    *,
    sequence_parallel: int = 1,
    fetch: str = "prefetch",
) -> ActivationRuntime:
    """Apply plan.layers to EVERY decoder layer present (a pipeline stage holds some of
    them), matched by layer_index, keep-all layers included so that each is measured;
    returns the runtime that measures them (`memplan profile`, tests, benchmarks).

    Usage: `apply_activation_plan(model.layers.values(), plan.layers, sequence_parallel=sp,
    fetch=plan.layout.activation_fetch)`.
    """
    runtime = ActivationRuntime(pool, fetch)
    _apply(layers, policies, runtime, sequence_parallel, skip_keep_all=False)
    return runtime


def apply_layer_policies(
    layers: Iterable[nn.Module],
    policies: Sequence[LayerPlan],
    runtime: ActivationRuntime,
    sequence_parallel: int = 1,
) -> None:
    """What the training runtimes do with plan.layers: each layer whose policy offloads or
    recomputes anything runs through the engine; a layer that keeps everything keeps its
    plain forward (no hooks, no overhead)."""
    _apply(layers, policies, runtime, sequence_parallel, skip_keep_all=True)


def _apply(
    layers: Iterable[nn.Module],
    policies: Sequence[LayerPlan],
    runtime: ActivationRuntime,
    sequence_parallel: int,
    skip_keep_all: bool,
) -> None:
    by_index = {policy.index: policy for policy in policies}
    for layer in layers:
        index = int(layer.layer_index)
        if index not in by_index:
            raise ValueError(f"the plan has no policy for layer {index}")
        if skip_keep_all and by_index[index].keeps_everything:
            continue
        apply_activation_policy(
            layer, by_index[index], runtime=runtime, sequence_parallel=sequence_parallel
        )


def reserve_plan_host_memory(
    runtime: ActivationRuntime,
    device: torch.device,
    model: ModelConfig,
    plan: Plan,
    slabs_per_layer: Mapping[int, int],
) -> int:
    """Allocate, before the first step, the host slabs the plan's layers on this rank will
    lease: for layer i, slabs_per_layer[i] slabs (its micro-batches in flight at once) of the
    plan's predicted host bytes for one micro-batch (planner/activations.py, the same
    inventory the plan's memory figures come from). Pinned on CUDA. Returns bytes reserved.

    The pool matches a request to a slab within a small slack, so when the prediction holds
    (tests/unit/test_offload_memory.py: within 2%) even step 1 allocates nothing; when it
    does not, the pool allocates what is missing in step 1 and reuses it afterwards."""
    layout = plan.layout
    shape = LayerShape.of(model, dtype_bytes(plan.train.dtype), layout.tp, layout.sp)
    seq_local = plan.train.seq_len // layout.sp
    if runtime.pool is None:
        runtime.pool = make_pool(device)
    before = runtime.pool.allocated_bytes
    for policy in plan.layers:
        count = slabs_per_layer.get(policy.index, 0)
        if count <= 0 or policy.keeps_everything:
            continue
        predicted = layer_activation_bytes(shape, layout.micro_batch_size, seq_local, policy)
        reserve_host_memory(runtime.pool, [predicted.host_bytes], count)
    return runtime.pool.allocated_bytes - before


def remove_activation_policy(layer: nn.Module) -> None:
    """Back to the plain forward (everything saved stays on the device)."""
    layer.activation_policy = None
    layer.cheap_op_runner = None


def reserve_host_memory(
    pool: HostBufferPool, host_bytes_per_layer: Iterable[int], micro_batches_in_flight: int = 1
) -> None:
    """Preallocate one slab per layer and micro-batch in flight from predicted host bytes
    (planner.activations.layer_activation_bytes(...).host_bytes), before the training loop.
    Each slab gets room for the alignment padding of up to 32 pieces."""
    sizes = [size + 32 * ALIGN_BYTES for size in host_bytes_per_layer if size > 0]
    pool.reserve(size for size in sizes for _ in range(micro_batches_in_flight))
