"""The activation engine of one decoder layer: keep, offload or recompute what the plan says.

One forward of a layer with a policy (LayerPlan: offload_fraction alpha, recompute_fraction
rho, anchor_offload_fraction beta, recompute none|selective|full) runs like this:

    x ------------------------------------------------ anchor (beta of its tokens to host)
    pre_attention on tokens [0,n_off) [n_off,n_off+n_rec) [rest)    token-local segments
       -> cat q, k, v
    attention_core(q, k, v) on all tokens   everything it saves: anchors; its output o too
    post_attention on the same three token segments -> cat -> layer output

(n_off, n_rec) = planner.activations.token_split(seq, alpha, rho), the rounding the planner
uses, so prediction and runtime agree exactly. Inside one saved_tensors_hooks context the
engine classifies every saved tensor by its storage (records.py):
- parameters, RoPE tables, tensors on another device: left alone;
- the layer input, the attention output and whatever attention_core saves: anchors, never
  recomputed token-wise; the first round(beta * seq) tokens of each go to a host slab;
- a storage first saved in the offload segment: copied to a host slab when the forward ends;
- in the recompute segment: dropped; regenerated in backward from the anchors;
- in the keep segment: kept on the device.
recompute=selective adds recipes: norm outputs and the SwiGLU product (routed through the
layer's cheap_op_runner) are recomputed from their inputs when first unpacked, wherever their
tokens live. recompute=full runs the layer as one segment and keeps only the layer input.

Backward: the first unpack of a layer fetches its own host data (if not already in flight)
and starts the prefetch of the layer processed next in backward (MEMO: one layer ahead).

Why not torch.utils.checkpoint and selective-checkpoint policies for the recompute modes:
they re-run a whole region for all of its tokens, while token-wise recomputation regenerates
only a token slice and keeps or offloads the rest of the same tensors; and a full
checkpoint's saved input could not go to a host slab (beta) through the same records. One
mechanism for every mode also keeps the byte accounting (what is kept, offloaded, recomputed)
in one place, which is what `memplan profile` measures against the plan. Exactness against
the plain layer is tested for random mixes of every mode (tests/unit/test_offload_engine.py).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from offload.pool import HostBufferPool, SlabLease, align_up
from offload.records import (
    AliasHandle,
    AnchorRecord,
    DTensorHandle,
    KeptRecord,
    OffloadRecord,
    Placeholder,
    Recipe,
    RecipeHandle,
    Record,
    Segment,
    StorageKey,
    ViewMeta,
    covers_storage,
    storage_key,
)
from planner.activations import token_split
from planner.plan import LayerPlan

if TYPE_CHECKING:
    from framework.components.model import DecoderLayer, Rope
    from offload.apply import ActivationRuntime

KEEP, OFFLOAD, RECOMPUTE, FULL = "keep", "offload", "recompute", "full"

_active = threading.local()
"""The layer forward being recorded on this thread (selective recipes look it up)."""


@dataclass(frozen=True)
class LayerActivationStats:
    """Saved-activation bytes of one layer forward (one micro-batch), measured from the
    storages the engine actually holds (storage.nbytes(), each storage once)."""

    device_bytes: int
    """Device storages retained for backward."""
    host_bytes: int
    """Host slab bytes holding offloaded data."""
    recomputed_bytes: int
    """Storages dropped in forward and regenerated in backward."""


def token_segments(seq: int, policy: LayerPlan) -> list[tuple[str, int, int]]:
    """The non-empty (kind, start, stop) token segments of a layer with `policy`."""
    if policy.recompute == FULL:
        return [(FULL, 0, seq)]
    offloaded, recomputed = token_split(seq, policy.offload_fraction, policy.recompute_fraction)
    bounds = [
        (OFFLOAD, 0, offloaded),
        (RECOMPUTE, offloaded, offloaded + recomputed),
        (KEEP, offloaded + recomputed, seq),
    ]
    return [(kind, start, stop) for kind, start, stop in bounds if stop > start]


def _sequence_dim(tensor: Tensor, tokens: int) -> int | None:
    """The sequence dim of a tensor saved by the attention core ([b, heads, s, ...] for SDPA's
    q/k/v/out/lse); dim 2 is preferred when several dims have `tokens` elements."""
    if tensor.dim() >= 3 and tensor.shape[2] == tokens:
        return 2
    for dim in range(1, tensor.dim()):
        if tensor.shape[dim] == tokens:
            return dim
    return None


def _is_parameter_cast(tensor: Tensor) -> bool:
    """An autocast copy of a parameter (or a view of one): model state, not an activation."""
    base = tensor._base if tensor._base is not None else tensor
    grad_fn = base.grad_fn
    if grad_fn is None or not type(grad_fn).__name__.startswith("ToCopyBackward"):
        return False
    return any(type(fn).__name__ == "AccumulateGrad" for fn, _ in grad_fn.next_functions if fn)


def _local(tensor: Tensor) -> Tensor:
    local = getattr(tensor, "_local_tensor", None)
    return local if isinstance(local, Tensor) else tensor


def _is_dtensor(tensor: Tensor) -> bool:
    return type(tensor).__name__ == "DTensor" and hasattr(tensor, "_local_tensor")


def unpack_any(packed: Any) -> Tensor:
    """The unpack hook: any handle the engine (or a DTensor wrapper) produced."""
    if isinstance(packed, Tensor):
        return packed
    if isinstance(packed, DTensorHandle):
        return packed.unpack_with(unpack_any(packed.inner))
    return packed.unpack()


class LayerForward:
    """Saved-tensor bookkeeping of ONE forward of one layer (one micro-batch)."""

    def __init__(self, engine: LayerActivationEngine, layer: nn.Module, x: Tensor, rope: Rope):
        self.engine = engine
        self.policy = engine.policy
        self.device = x.device
        self.streams, self.pool = engine.runtime.resources(x.device)
        self.seq = x.shape[1]
        self.anchor_tokens, _ = token_split(self.seq, self.policy.anchor_offload_fraction, 0.0)
        self.core_tokens = self.seq * engine.sequence_parallel
        self.records: dict[StorageKey, Record] = {}
        self.aliases: dict[StorageKey, AliasHandle] = {}
        self.recipes: dict[StorageKey, Recipe] = {}
        self.dropped: dict[StorageKey, Tensor] = {}  # held until the segment ends
        self.segment: Segment | None = None
        self.in_core = False
        self.position = 0
        self.recomputed_bytes = 0
        self.external = {storage_key(_local(p)) for p in layer.parameters()}
        self.shared = {storage_key(table): table.untyped_storage().nbytes() for table in rope}
        """The RoPE tables every layer saves (bytes outside any one layer)."""
        self.external |= set(self.shared)
        self.autocast_enabled = torch.is_autocast_enabled(self.device.type)
        self.autocast_dtype = torch.get_autocast_dtype(self.device.type)
        self.d2h_event: torch.cuda.Event | None = None
        self.live: list[weakref.ref[Record]] = []
        self.prev: LayerForward | None = None
        self.backward_started = False
        self.fetched = False
        self.stats: LayerActivationStats | None = None

    # ---- forward: classification -------------------------------------------------------
    def pack(self, tensor: Tensor) -> Any:
        """The pack hook."""
        position = self.position
        self.position += 1
        return self._classify(tensor, position)

    def _classify(self, tensor: Tensor, position: int | None) -> Any:
        if _is_dtensor(tensor):
            return DTensorHandle(self._classify(_local(tensor), position), tensor)
        if self._is_external(tensor):
            return tensor
        key = storage_key(tensor)
        if key in self.aliases:
            alias = self.aliases[key]
            return AliasHandle(
                alias.anchor, alias.anchor_meta, alias.start, alias.stop, ViewMeta.of(tensor)
            )
        record = self.records.get(key)
        if record is not None:
            return record.handle(tensor)  # type: ignore[attr-defined]
        if key in self.recipes:
            return RecipeHandle(self.recipes[key], ViewMeta.of(tensor))
        if self.in_core:
            return self._new_anchor(tensor, _sequence_dim(tensor, self.core_tokens)).handle(tensor)
        segment = self.segment
        if segment is not None and segment.kind in (RECOMPUTE, FULL):
            assert position is not None, "an engine-held input cannot be dropped"
            segment.wanted.add(position)
            self._count_recomputed(key, tensor)
            return Placeholder(segment, position)
        if segment is not None and segment.kind == OFFLOAD:
            record = OffloadRecord(self, tensor)
        else:
            record = KeptRecord(self, tensor)
        self.records[key] = record
        return record.handle(tensor)

    def _is_external(self, tensor: Tensor) -> bool:
        if tensor.device != self.device or isinstance(tensor, nn.Parameter):
            return True
        if tensor.untyped_storage().nbytes() == 0:
            return True
        return storage_key(tensor) in self.external or _is_parameter_cast(tensor)

    def _new_anchor(self, tensor: Tensor, seq_dim: int | None) -> Record:
        """A record for an anchor storage: split beta of its tokens off when it can."""
        record: Record | None = None
        tokens = tensor.shape[seq_dim] if seq_dim is not None else 0
        if (
            self.anchor_tokens > 0
            and seq_dim is not None
            and tokens % self.seq == 0
            and covers_storage(tensor)
        ):
            record = AnchorRecord(self, tensor, seq_dim, self.anchor_tokens * tokens // self.seq)
        else:
            record = KeptRecord(self, tensor)
        self.records[storage_key(tensor)] = record
        return record

    def _count_recomputed(self, key: StorageKey, tensor: Tensor) -> None:
        if key not in self.dropped:
            self.dropped[key] = tensor
            self.recomputed_bytes += tensor.untyped_storage().nbytes()

    # ---- forward: regions ---------------------------------------------------------------
    @contextmanager
    def recording(self) -> Iterator[None]:
        """One saved_tensors_hooks context for the whole layer forward."""
        previous = getattr(_active, "forward", None)
        _active.forward = self
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, unpack_any):
                yield
        finally:
            _active.forward = previous

    def register_anchor(self, tensor: Tensor) -> Tensor:
        """The layer input or the attention output ([b, s, ...]); returns the tensor to use
        (a copy when beta > 0 and it does not own its storage, so it can be split)."""
        if self.anchor_tokens > 0 and not covers_storage(tensor):
            tensor = tensor.clone()
        if storage_key(tensor) not in self.records:
            self._new_anchor(tensor, 1)
        return tensor

    @contextmanager
    def region(
        self, kind: str, fn: Callable[..., Any], inputs: tuple[Tensor, ...], extra: tuple = ()
    ) -> Iterator[None]:
        """A token segment of a token-local region (or the whole layer for full)."""
        segment = Segment(self, kind, fn, extra)
        if kind in (RECOMPUTE, FULL):
            segment.inputs = [self._classify(t, None) for t in inputs]
            segment.requires_grad = [t.requires_grad for t in inputs]
        self.segment, self.position = segment, 0
        try:
            yield
        finally:
            segment.saved_count = self.position
            self.segment = None
            self.recipes.clear()
            self.dropped.clear()

    @contextmanager
    def core(self) -> Iterator[None]:
        """The attention core: everything saved here is an anchor."""
        self.in_core = True
        try:
            yield
        finally:
            self.in_core = False

    def output_slice(self, o: Tensor, start: int, stop: int) -> Tensor:
        """o[:, start:stop] for a post-attention segment, as a contiguous tensor whose saved
        views resolve to the anchor o (a strided slice would be copied by the projection)."""
        piece = o[:, start:stop]
        if piece.is_contiguous():
            return piece
        piece = piece.contiguous()
        anchor = self.records[storage_key(o)]
        self.aliases[storage_key(piece)] = AliasHandle(
            anchor, ViewMeta.of(o), start, stop, ViewMeta.of(piece)
        )
        return piece

    def end_output_slice(self, piece: Tensor) -> None:
        self.aliases.pop(storage_key(piece), None)

    def add_recipe(self, fn: Callable[..., Tensor], args: tuple[Tensor, ...], out: Tensor) -> None:
        """Selective: out = fn(*args) is recomputed, not kept, wherever it is saved."""
        key = storage_key(out)
        self.recipes[key] = Recipe(self, fn, [self._classify(a, None) for a in args], out)
        self._count_recomputed(key, out)

    def recipes_enabled(self) -> bool:
        segment = self.segment
        return (
            self.policy.recompute == "selective"
            and segment is not None
            and segment.kind in (KEEP, OFFLOAD)
        )

    # ---- end of forward --------------------------------------------------------------------
    def finish(self) -> LayerActivationStats:
        """Move host parts to a slab (async on CUDA), free what is not kept, measure."""
        records = list(self.records.values())
        for record in records:
            record.seal_device()
        sizes = [record.host_bytes_needed() for record in records]
        total = sum(align_up(size) for size in sizes if size)
        if total:
            lease = SlabLease(self.pool, total)
            with self.streams.offload():
                self.streams.wait(lease.ready)
                offset = 0
                for record, size in zip(records, sizes, strict=True):
                    if size:
                        record.seal(lease, offset)
                        offset += align_up(size)
                self.d2h_event = self.streams.record()
            lease.last_event = self.d2h_event
        self.stats = LayerActivationStats(
            device_bytes=sum(record.device_bytes() for record in records),
            host_bytes=sum(record.host_bytes() for record in records),
            recomputed_bytes=self.recomputed_bytes,
        )
        self.live = [weakref.ref(record) for record in records]
        self.records.clear()
        return self.stats

    def measure(self) -> LayerActivationStats:
        """The same measurement, now, over the records still alive (autograd holds them)."""
        records = [record for ref in self.live if (record := ref()) is not None]
        return LayerActivationStats(
            device_bytes=sum(record.device_bytes() for record in records),
            host_bytes=sum(record.host_bytes() for record in records),
            recomputed_bytes=self.recomputed_bytes,
        )

    # ---- backward ------------------------------------------------------------------------
    def on_unpack(self) -> None:
        """Called by every handle: the first one fetches this layer and prefetches the next."""
        if self.backward_started:
            return
        self.backward_started = True
        self.fetch()
        prev, self.prev = self.prev, None
        if prev is not None:
            prev.fetch()

    def fetch(self) -> None:
        """Start the host-to-device copies of this layer forward's host data."""
        if self.fetched:
            return
        self.fetched = True
        for ref in self.live:
            record = ref()
            if record is not None:
                record.fetch()

    def unpack(self, packed: Any) -> Tensor:
        return unpack_any(packed)

    def autocast(self) -> Any:
        return torch.autocast(
            self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_enabled
        )


class LayerActivationEngine:
    """The `activation_policy` and `cheap_op_runner` of one layer (see the module docstring)."""

    def __init__(
        self,
        policy: LayerPlan,
        runtime: ActivationRuntime,
        position: int,
        sequence_parallel: int = 1,
    ) -> None:
        self.policy = policy
        self.runtime = runtime
        self.position = position
        """Order of the layer in the model's forward (for prefetch one layer ahead)."""
        self.sequence_parallel = sequence_parallel
        self.last_stats: LayerActivationStats | None = None
        self.last_shared: dict[StorageKey, int] = {}
        """Storages the latest forward saved but does not own (RoPE tables), with bytes."""
        self._last: weakref.ref[LayerForward] | None = None

    def last_forward(self) -> LayerForward | None:
        """The latest forward's bookkeeping while autograd still holds it."""
        return self._last() if self._last is not None else None

    def run_cheap_op(self, fn: Callable[..., Tensor], *args: Tensor) -> Tensor:
        """cheap_op_runner: under selective recomputation, outputs become recipes."""
        out = fn(*args)
        forward = getattr(_active, "forward", None)
        if forward is not None and forward.engine is self and forward.recipes_enabled():
            forward.add_recipe(fn, args, out)
        return out

    def __call__(self, layer: DecoderLayer, x: Tensor, rope: Rope) -> Tensor:
        if not torch.is_grad_enabled():
            q, k, v = layer.pre_attention(x, rope)
            return layer.post_attention(x, layer.attention_core(q, k, v))
        forward = LayerForward(self, layer, x, rope)
        self.runtime.link(forward, self.position)
        with forward.recording():
            if self.policy.recompute == FULL:
                out = self._full(forward, layer, x, rope)
            else:
                out = self._segmented(forward, layer, x, rope)
        self.last_stats = forward.finish()
        self.last_shared = forward.shared
        self._last = weakref.ref(forward)
        return out

    @staticmethod
    def _full(forward: LayerForward, layer: DecoderLayer, x: Tensor, rope: Rope) -> Tensor:
        x = forward.register_anchor(x)

        def whole_layer(x: Tensor, rope: Rope) -> Tensor:
            q, k, v = layer.pre_attention(x, rope)
            return layer.post_attention(x, layer.attention_core(q, k, v))

        with forward.region(FULL, whole_layer, (x,), (rope,)):
            return whole_layer(x, rope)

    @staticmethod
    def _segmented(forward: LayerForward, layer: DecoderLayer, x: Tensor, rope: Rope) -> Tensor:
        x = forward.register_anchor(x)
        segments = token_segments(x.shape[1], forward.policy)
        single = len(segments) == 1
        cos, sin = rope
        projections = []
        for kind, start, stop in segments:
            xs = x if single else x[:, start:stop]
            rs = rope if single else (cos[start:stop], sin[start:stop])
            with forward.region(kind, layer.pre_attention, (xs,), (rs,)):
                projections.append(layer.pre_attention(xs, rs))
        q, k, v = (
            parts[0] if single else torch.cat(parts, dim=1)
            for parts in zip(*projections, strict=True)
        )
        del projections
        with forward.core():
            o = layer.attention_core(q, k, v)
        del q, k, v
        o = forward.register_anchor(o)
        outputs = []
        for kind, start, stop in segments:
            xs = x if single else x[:, start:stop]
            os = o if single else forward.output_slice(o, start, stop)
            with forward.region(kind, layer.post_attention, (xs, os)):
                outputs.append(layer.post_attention(xs, os))
            forward.end_output_slice(os)
        return outputs[0] if single else torch.cat(outputs, dim=1)


def make_pool(device: torch.device) -> HostBufferPool:
    """A host pool for `device`: pinned when it is a CUDA device."""
    return HostBufferPool(pin_memory=device.type == "cuda")
