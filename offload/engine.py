"""The activation engine of one decoder layer: keep, offload or recompute what the plan says.

One forward of a layer with a policy (LayerPlan: offload_fraction alpha, recompute_fraction
rho, anchor_offload_fraction beta, recompute none|selective|full) runs the plain layer's ops,
on all tokens at once, in three recorded parts:

    x ------------------------------------------------ anchor (beta of its tokens to host)
    pre_attention(x, rope)          token-local region: what it saves is split by tokens
    attention_core(q, k, v)         everything it saves: anchors; its output o too
    post_attention(x, o)            token-local region: split by tokens -> layer output

Inside one saved_tensors_hooks context the engine classifies every saved tensor by its
storage (records.py):
- parameters, RoPE tables, tensors on another device: left alone;
- the layer input, the attention output and whatever attention_core saves: anchors, never
  recomputed token-wise; the first round(beta * seq) tokens of each go to a host slab;
- a storage first saved in a token-local region ([batch, seq, ...] in memory): its tokens
  [0, n_off) go to a host slab when the forward ends, [n_off, n_off + n_rec) are dropped and
  regenerated in backward by running the region again on that token slice of the anchors,
  the rest is kept on the device as a fresh copy (a kept slice never pins the whole storage).
(n_off, n_rec) = planner.activations.token_split(seq, alpha, rho) (token_segments), the
rounding the planner uses, so prediction and runtime agree exactly.
recompute=selective adds recipes: norm outputs and the SwiGLU product (routed through the
layer's cheap_op_runner) are recomputed from their inputs when first unpacked, wherever their
tokens live. recompute=full runs the layer as one region and keeps only the layer input.

Why split storages, not the computation: running each region once per token segment (as
this engine did before) gives the same bytes, but every extra segment costs a pass over the
weights and a weight-gradient accumulation per linear, the q/k/v and output concatenations
and the slicing's backward: on the CPU, splitting plain layers into two token segments costs
+7% of the step even for a 1-token segment, and token-wise recomputation of 25% of the
tokens cost 0.6-0.7x of full recomputation's extra time (BENCHMARKS.md). Splitting storages
costs a copy of the kept tokens when a region ends and one re-assembly on first unpack
(records.TokenSplitRecord): (2 - rho) x the token-local bytes. Regeneration stops at the
last dropped tensor, as torch.utils.checkpoint's early stop does: the pre-attention region
recomputes only its norm, the post-attention region and full recomputation stop before w2.

Backward: the first unpack of a layer fetches its own host data (if not already in flight)
and starts the prefetch of the layer processed next in backward (MEMO: one layer ahead), so
the copies overlap compute. With the plan's layout.activation_fetch = "on_demand" nothing is
fetched ahead: each storage comes back when autograd first unpacks it (as torch's
save_on_cpu unpacks one tensor at a time) and is freed with its last saved view, so at a
layer's SwiGLU backward only the SwiGLU's inputs of that layer are back, not the whole
layer and the next one; the copies then have nothing to hide behind (planner/timing.py).
The RoPE tables, which every layer saves, go to the host too (once per step, shared by the
layers: records.SharedTableRecord), so after the forward no device copy of them is left.

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
    AnchorRecord,
    DTensorHandle,
    KeptRecord,
    OffloadRecord,
    Placeholder,
    Recipe,
    RecipeHandle,
    Record,
    Region,
    SharedTableRecord,
    StorageKey,
    TokenSplitRecord,
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
TOKEN_LOCAL = "token-local"
"""The kind of a pre- or post-attention region call (FULL: the whole layer)."""

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
    """The non-empty (kind, start, stop) token ranges of a layer with `policy`: which tokens
    of every token-local storage go to the host, are regenerated in backward, are kept."""
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


def token_major(tensor: Tensor, batch: int, tokens: int) -> bool:
    """True when tensor is contiguous, fills its storage and is laid out [batch, tokens, ...]
    (or [batch * tokens, ...], a folded view of that): token t of sequence i then starts at
    byte (i * tokens + t) * P of the storage, so any token slice of it is well defined."""
    shape = tensor.shape
    if len(shape) < 2 or not tensor.is_contiguous() or not covers_storage(tensor):
        return False
    return (shape[0] == batch and shape[1] == tokens) or shape[0] == batch * tokens


class LayerForward:
    """Saved-tensor bookkeeping of ONE forward of one layer (one micro-batch)."""

    def __init__(self, engine: LayerActivationEngine, layer: nn.Module, x: Tensor, rope: Rope):
        self.engine = engine
        self.policy = engine.policy
        self.device = x.device
        self.streams, self.pool = engine.runtime.resources(x.device)
        self.batch, self.seq = x.shape[0], x.shape[1]
        self.anchor_tokens, _ = token_split(self.seq, self.policy.anchor_offload_fraction, 0.0)
        self.core_tokens = self.seq * engine.sequence_parallel
        spans = {kind: (a, b) for kind, a, b in token_segments(self.seq, self.policy)}
        self.host_tokens = spans.get(OFFLOAD, (0, 0))[1]
        self.recompute_span = spans.get(RECOMPUTE, (self.host_tokens, self.host_tokens))
        """Tokens [start, stop) of every token-local storage that are regenerated."""
        self.records: dict[StorageKey, Record] = {}
        """Records by storage, while their storage may still be saved again."""
        self.owned: list[Record] = []
        """Every record of this forward, in creation order."""
        self.region_records: dict[StorageKey, Record] = {}
        """Records first saved in the current region."""
        self.recipes: dict[StorageKey, Recipe] = {}
        self.dropped: dict[StorageKey, Tensor] = {}  # held until the region ends
        self.region: Region | None = None
        self.in_core = False
        self.position = 0
        self.recomputed_bytes = 0
        self.external = {storage_key(_local(p)) for p in layer.parameters()}
        self.shared = {storage_key(table): table.untyped_storage().nbytes() for table in rope}
        """The RoPE tables every layer saves (bytes outside any one layer)."""
        self.external |= set(self.shared)
        self.shared_tables: dict[StorageKey, SharedTableRecord] = {}
        """Fetching on demand: the tables' one host copy for the step, by storage."""
        if engine.runtime.on_demand:
            for table in rope:
                key = storage_key(table)
                record = engine.runtime.shared_table(table, key, self.streams, self.pool)
                self.shared_tables[key] = record
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
        if tensor.device != self.device or isinstance(tensor, nn.Parameter):
            return tensor
        key = storage_key(tensor)
        record = self.records.get(key)
        if record is not None:
            return record.handle(tensor)  # type: ignore[attr-defined]
        table = self.shared_tables.get(key)
        if table is not None:
            return table.handle(tensor)
        if key in self.external or tensor.untyped_storage().nbytes() == 0:
            return tensor
        recipe = self.recipes.get(key)
        if recipe is not None:
            return RecipeHandle(recipe, ViewMeta.of(tensor))
        if _is_parameter_cast(tensor):
            return tensor
        if self.in_core:
            return self._new_anchor(tensor, _sequence_dim(tensor, self.core_tokens)).handle(tensor)
        region = self.region
        if region is not None and region.kind == FULL:
            assert position is not None, "an engine-held input cannot be dropped"
            region.wanted.add(position)
            self._count_recomputed(key, tensor)
            return Placeholder(region, position)
        record = self._token_local(tensor, region, position)
        self.records[key] = record
        self.owned.append(record)
        if region is not None:
            self.region_records[key] = record
        return record.handle(tensor)  # type: ignore[attr-defined]

    def _token_local(self, tensor: Tensor, region: Region | None, position: int | None) -> Record:
        """The record of a storage first saved in a token-local region: split by tokens when
        the policy offloads or recomputes some and its layout allows it, else kept."""
        start, stop = self.recompute_span
        if region is None or not (self.host_tokens or stop > start):
            return KeptRecord(self, tensor)
        if position is None:
            stop = start  # an engine-held input, not saved by the region: nothing regenerates it
        if not token_major(tensor, self.batch, self.seq) or not (self.host_tokens or stop > start):
            return KeptRecord(self, tensor)
        kind = OffloadRecord if self.host_tokens else TokenSplitRecord
        record = kind(
            self, tensor, self.batch, self.seq, self.host_tokens, stop - start, region, position
        )
        if stop > start:
            region.wanted.add(position)  # type: ignore[arg-type]
            self.recomputed_bytes += record.recompute_bytes
        return record

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
        self.owned.append(record)
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
    def region_call(
        self, kind: str, fn: Callable[..., Any], inputs: tuple[Tensor, ...], rope: Rope | None
    ) -> Iterator[None]:
        """A token-local region on all tokens (TOKEN_LOCAL), or the whole layer (FULL).

        When it ends, the region's token-split records without a host part are sealed now
        (their recompute tokens freed, their kept tokens copied): a region's storages are
        not saved again after it (its outputs are anchors of the attention core or the next
        layer's input), and the forward's own references to them are gone. Records with a
        host part wait for finish(), where one slab takes the whole layer's host data."""
        start, stop = (0, self.seq) if kind == FULL else self.recompute_span
        if rope is not None and self.shared_tables:  # not the device tables: their host copy
            rope = tuple(self.shared_tables[storage_key(t)].handle(t) for t in rope)
        region = Region(self, kind, fn, rope, start, stop, self.seq)
        if stop > start:
            region.inputs = [self._classify(t, None) for t in inputs]
            region.requires_grad = [t.requires_grad for t in inputs]
        self.region, self.position = region, 0
        try:
            yield
        finally:
            region.saved_count = self.position
            self.region = None
            self.recipes.clear()
            self.dropped.clear()
            for key, record in self.region_records.items():
                if isinstance(record, TokenSplitRecord) and not record.host_tokens:
                    record.seal_device()
                    # its storage is gone: the address may be reused within this forward
                    del self.records[key]
            self.region_records.clear()

    @contextmanager
    def core(self) -> Iterator[None]:
        """The attention core: everything saved here is an anchor."""
        self.in_core = True
        try:
            yield
        finally:
            self.in_core = False

    def add_recipe(self, fn: Callable[..., Tensor], args: tuple[Tensor, ...], out: Tensor) -> None:
        """Selective: out = fn(*args) is recomputed, not kept, wherever it is saved."""
        key = storage_key(out)
        self.recipes[key] = Recipe(self, fn, [self._classify(a, None) for a in args], out)
        self._count_recomputed(key, out)

    def recipes_enabled(self) -> bool:
        region = self.region
        return self.policy.recompute == "selective" and region is not None and region.kind != FULL

    # ---- end of forward --------------------------------------------------------------------
    def finish(self) -> LayerActivationStats:
        """Move host parts to a slab (async on CUDA), free what is not kept, measure."""
        records = list(self.owned)
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
        self.owned.clear()
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
        """Called by every handle: the first one fetches this layer and prefetches the next.
        Fetching on demand (layout.activation_fetch), nothing is fetched ahead: each record
        brings its own host part back when it is first unpacked (records.py storage())."""
        if self.backward_started:
            return
        self.backward_started = True
        if self.engine.runtime.on_demand:
            self.prev = None
            return
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
                out = self._by_region(forward, layer, x, rope)
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

        with forward.region_call(FULL, whole_layer, (x,), rope):
            return whole_layer(x, rope)

    @staticmethod
    def _by_region(forward: LayerForward, layer: DecoderLayer, x: Tensor, rope: Rope) -> Tensor:
        """The plain layer's ops on all tokens; what each region saves is split by tokens."""
        x = forward.register_anchor(x)
        with forward.region_call(TOKEN_LOCAL, layer.pre_attention, (x,), rope):
            q, k, v = layer.pre_attention(x, rope)
        with forward.core():
            o = layer.attention_core(q, k, v)
        del q, k, v
        o = forward.register_anchor(o)
        with forward.region_call(TOKEN_LOCAL, layer.post_attention, (x, o), None):
            return layer.post_attention(x, o)


def make_pool(device: torch.device) -> HostBufferPool:
    """A host pool for `device`: pinned when it is a CUDA device."""
    return HostBufferPool(pin_memory=device.type == "cuda")
