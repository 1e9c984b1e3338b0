"""Trace one training step of a plan's own runtime under FakeTensorMode: real shapes, no
memory, no GPU. `memplan profile profile.mode=trace` (launch/profile_command.py).

    trace_plan(model_cfg, train_cfg, plan) -> TraceReport

What runs: the runtime the plan names (framework/runtime: LocalRuntime for one unsharded
process, ParallelRuntime with FSDP2 for ZeRO-2/3 or more than one rank) at the plan's real
per-rank dimensions, with its activation policies (parallel.parallelize / offload), AdamW
and LR schedule. Step 1 runs untracked (it creates the optimizer state); step 2 runs under
torch's MemTracker (replicated parameters: one process, ZeRO-0/1) or FSDPMemTracker
(FSDP2, ZeRO-2/3), and its peak is the traced peak; phases (forward/backward of layer l, the
loss, gradient reduction, optimizer step) are labelled from the trackers' module tracker.
More than one rank: a fake process group (torch.testing fake_pg) of the plan's world size,
rank 0 traced (every dp rank holds the same shapes).

What differs from the real runtime (all of it here):
- device: fake CPU tensors in the plan's dtype. The device mesh is built before the fake mode
  (DeviceMesh reads its rank map with .tolist(), which fake tensors cannot give).
- materialisation: `nn.Module.to_empty` cannot swap fake parameters (every nn.Parameter of a
  fake tensor carries a weak reference, and torch.utils.swap_tensors refuses those), so while
  the runtime is built `to_empty` replaces each parameter object instead (ties kept; FSDP2's
  sharded parameters re-registered as FSDPModule._apply does). init_weights runs as is.
- offload's storage identity: offload.records.storage_key uses data_ptr(), which is 0 for
  every fake storage (so every saved tensor would look like the first one, or like a
  parameter); while tracing, offload.engine uses the StorageImpl's address instead
  (fake_storage_identity), which is unique while the storage lives, as data_ptr is on a GPU.
- offload: the host slabs (offload/pool.py) are created as fake CPU tensors like everything
  else, so one device cannot tell them apart from GPU memory: they are tracked from the start
  of step 2 (MemTracker's Other, FSDPMemTracker's Inputs), subtracted from every traced
  device figure and reported as host bytes.
- views by set_: offload/records.py (_bytes_of) views a storage with `torch.empty(0,
  device=storage.device).set_(storage)`; a fake storage's device is meta, so those views
  would be meta tensors, filed by the tracker under a meta device beside the CPU storage
  they alias. While tracing they are made on the traced device instead; anything still
  filed under meta is left out of the traced figures.
- the fake mode's dispatch cache is off: its keys hold argument storages (aten.set_, which
  offload uses to view a storage), which kept those storages alive, and counted, to the end
  of the step (measured: +34% on a 2-layer offload/recompute step against the real one).
- tensor parallel over FSDP2: fully_shard of TP DTensor parameters concatenates the dp and
  tp meshes (DeviceMesh._concatenate), which computes this rank's coordinates with
  aten.nonzero, a data-dependent shape fake tensors cannot know; while tracing it runs
  outside the fake mode on the meshes' real rank maps (fake_mesh_concatenation).
- pipeline layouts (one stage per rank): every pp rank is traced (the fake group's rank set
  to it). The schedules' point-to-point transfers run on the fake group, which moves no data
  (a received activation is a fake tensor of the right shape, as it is here anyway); the
  p2p warm-up vote of torch's schedules (torch >= 2.13) reads its result with .item(), so
  while tracing the stages are set to the static shapes they are built with instead
  (static_pipeline_shapes).
- layouts not traced: pipelines with more than one stage per rank (interleaved, ZBV:
  FSDPMemTracker tracks one root module) and DeepSpeed (its engine initialises real buffers
  and communicators).
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed.device_mesh import DeviceMesh

from configs.schema import ModelConfig, TrainConfig
from planner.plan import Plan

logger = logging.getLogger(__name__)

TOTAL_KEY = "Total"
"""MemTracker's key for the sum of every category of a snapshot."""


@dataclass
class PhaseBytes:
    """Traced peak of one phase of the step (device bytes, host slabs excluded)."""

    name: str
    traced_peak_bytes: int
    traced_at_peak: dict[str, int] = field(default_factory=dict)
    """The tracker's categories at this phase's peak (its own names, host slabs included)."""
    peak_op: str = ""
    """The operator whose output reached this phase's peak."""
    predicted_peak_bytes: int = 0
    """planner/memory.py predict_phase_peaks for this phase (0: not predicted: a phase that
    cannot hold the step's peak, or a layout whose phases the planner does not model)."""


@dataclass
class TraceReport:
    """Predicted vs traced bytes of one traced rank (the JSON of profile.out)."""

    runtime: str
    """LocalRuntime or ParallelRuntime; tracker: MemTracker or FSDPMemTracker."""
    tracker: str
    world_size: int
    traced_rank: int
    predicted_peak_bytes: int
    """plan.ranks[p].peak_bytes of the traced pipeline rank (plan.memory.gpu_peak_bytes)."""
    traced_peak_bytes: int
    """Step 2's device peak, host slabs excluded."""
    peak_phase: str
    """The phase of the step in which the traced peak falls."""
    predicted: dict[str, int]
    """The plan's breakdown at its peak: params, grads, optimizer, activations, other."""
    traced_at_peak: dict[str, int]
    """The tracker's categories at the traced peak (its own names)."""
    traced_host_bytes: int
    predicted_host_bytes: int
    traced_after_step_bytes: int
    """Device bytes still tracked when the step has returned (parameters, optimizer state and
    whatever else outlives the step)."""
    traced_gc_bytes: int
    """Of those, bytes that only the garbage collector freed (reference cycles)."""
    phases: list[PhaseBytes] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class UntracedLayout(ValueError):
    """A layout the tracer cannot run under fake tensors (untraced_reason says why); the
    profile command prints that one line instead of tracing."""


def untraced_reason(plan: Plan) -> str | None:
    """Why this plan's layout cannot be traced here (None: it can)."""
    layout = plan.layout
    if layout.pp > 1 and layout.virtual_stages > 1:
        return (
            f"pipeline layout with {layout.virtual_stages} stages per rank not traced: "
            "FSDPMemTracker tracks one root module, and each stage is one"
        )
    if layout.zero_backend == "deepspeed":
        return (
            "deepspeed layout not traced: DeepSpeed's engine allocates real buffers and "
            "communicators at initialisation, which fake tensors cannot stand in for"
        )
    return None


# -- materialisation under the fake mode --------------------------------------------------


def _fake_to_empty(module: nn.Module, *, device: Any, recurse: bool = True) -> nn.Module:
    """nn.Module.to_empty for fake tensors: new parameter objects (not swapped ones), shared
    parameters kept shared, FSDP2's sharded parameters re-registered."""
    from torch.distributed.fsdp import FSDPModule

    fsdp_modules = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for fsdp_module in fsdp_modules:
        fsdp_module.reshard()  # sharded parameters registered, as FSDPModule._apply does
    replaced: dict[int, nn.Parameter] = {}
    with torch.no_grad():
        for sub in module.modules() if recurse else [module]:
            for key, param in list(sub._parameters.items()):
                if param is None:
                    continue
                if id(param) not in replaced:
                    value = torch.empty_like(param, device=device)
                    replaced[id(param)] = nn.Parameter(value, requires_grad=param.requires_grad)
                sub._parameters[key] = replaced[id(param)]
            for key, buffer in list(sub._buffers.items()):
                if buffer is not None:
                    sub._buffers[key] = torch.empty_like(buffer, device=device)
    for fsdp_module in fsdp_modules:
        state = fsdp_module._get_fsdp_state()
        with torch.no_grad():
            for group in state._fsdp_param_groups:
                for fsdp_param in group.fsdp_params:
                    fsdp_param.reset_sharded_param()
    return module


@contextlib.contextmanager
def fake_materialisation() -> Iterator[None]:
    """nn.Module.to_empty replaced by _fake_to_empty while the runtime is built."""
    original = nn.Module.to_empty
    nn.Module.to_empty = _fake_to_empty  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.to_empty = original  # type: ignore[method-assign]


def _fake_storage_key(tensor: torch.Tensor) -> tuple[str, int, int]:
    """offload.records.storage_key for fake tensors: the StorageImpl address, not data_ptr."""
    return (tensor.device.type, tensor.device.index or 0, tensor.untyped_storage()._cdata)


def _fake_bytes_of(storage: torch.UntypedStorage, rows: int, row_bytes: int) -> torch.Tensor:
    """offload.records._bytes_of for fake storages (whose device is meta): a CPU view."""
    device = torch.device("cpu") if storage.device.type == "meta" else storage.device
    view = torch.empty(0, dtype=torch.uint8, device=device)
    return view.set_(storage, 0, (rows, row_bytes))


@contextlib.contextmanager
def fake_storage_identity() -> Iterator[None]:
    """offload's storage identity by StorageImpl address, and its byte views of a storage on
    the traced device, while tracing (module doc)."""
    import offload.engine as engine
    import offload.records as records

    # records views storages through _bytes_of where it has one; older records view them
    # on the saved tensor's own device, which needs no patch
    has_bytes_of = hasattr(records, "_bytes_of")
    original = engine.storage_key, getattr(records, "_bytes_of", None)
    engine.storage_key = _fake_storage_key
    if has_bytes_of:
        records._bytes_of = _fake_bytes_of
    try:
        yield
    finally:
        engine.storage_key = original[0]
        if has_bytes_of:
            records._bytes_of = original[1]


@contextlib.contextmanager
def fake_mesh_concatenation() -> Iterator[None]:
    """DeviceMesh._concatenate outside the fake mode (module doc): the meshes' rank maps are
    real tensors, built before it, and so is the concatenated mesh."""
    original = DeviceMesh.__dict__["_concatenate"]  # the staticmethod object itself

    def concatenate(meshes: list[DeviceMesh]) -> DeviceMesh:
        with unset_fake_temporarily():
            return original.__func__(meshes)

    DeviceMesh._concatenate = staticmethod(concatenate)  # type: ignore[method-assign]
    try:
        yield
    finally:
        DeviceMesh._concatenate = original  # type: ignore[method-assign]


@contextlib.contextmanager
def static_pipeline_shapes() -> Iterator[None]:
    """torch's pipeline schedules without their p2p warm-up vote (module doc): every stage in
    static-shape mode, as parallel/pipeline.py builds them (torch < 2.13 has no vote)."""
    from torch.distributed.pipelining import schedules

    schedule = schedules._PipelineSchedule
    original = schedule.__dict__.get("_warmup_p2p")
    if original is None:
        yield
        return
    from torch.distributed.pipelining._utils import InferenceMode

    def warmup(self: Any, stages: list[Any], has_backward: bool, p2p_done: bool) -> None:
        for stage in stages:
            stage._inference_mode = InferenceMode.STATIC

    schedule._warmup_p2p = warmup
    try:
        yield
    finally:
        schedule._warmup_p2p = original


@contextlib.contextmanager
def fake_process_group(world_size: int, rank: int = 0) -> Iterator[None]:
    """The default group as torch's fake backend (`rank` of world_size) unless one exists."""
    if dist.is_initialized():
        yield
        return
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _uncached_fake_mode() -> FakeTensorMode:
    """A FakeTensorMode without its dispatch cache: the cache's keys hold the arguments'
    storages (aten.set_ takes one), so storages offload views with set_ would never die
    and the tracker would count them to the end of the step."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    mode.cache_enabled = False
    return mode


def _entered(*contexts: Any) -> contextlib.ExitStack:
    """One context manager entering `contexts` in order."""
    with contextlib.ExitStack() as stack:  # one that fails to enter exits the others
        for context in contexts:
            stack.enter_context(context)
        return stack.pop_all()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence fake tensors' data_ptr deprecation warning (fake_storage_identity avoids the
    call in the offload engine; other callers only compare addresses)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
        yield


# -- phases -----------------------------------------------------------------------------


def _phase_tracker(base: type[MemTracker]) -> type[MemTracker]:
    """`base` that also keeps the peak of every phase of the step (see phase_name)."""

    class PhaseTracker(base):  # type: ignore[valid-type,misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.stage = "forward"
            """Set by the step's phase wrappers: forward, finish_gradients, update."""
            self.forward_done = False
            self.layers_seen = False
            self.phase_peaks: dict[str, int] = {}
            self.phase_categories: dict[str, dict[str, int]] = {}
            self.phase_ops: dict[str, str] = {}
            self.peak_phase = ""
            self._best = -1

        def current_bytes(self) -> int:
            """Bytes tracked now, the meta device left out (module doc)."""
            return sum(
                snap.get(TOTAL_KEY, 0)
                for device, snap in self._curr_mem_snap.items()
                if device.type != "meta"
            )

        def categories_now(self) -> dict[str, int]:
            """Bytes tracked now by category (the tracker's names), the meta device left out."""
            out: dict[str, int] = {}
            for device, snap in self._curr_mem_snap.items():
                if device.type == "meta":
                    continue
                for key, value in snap.items():
                    if value and key != TOTAL_KEY:
                        name = str(getattr(key, "value", key))
                        out[name] = out.get(name, 0) + value
            return out

        def phase_name(self) -> str:
            if self._in_opt:
                return "optimizer step"
            if self.stage != "forward":
                return self.stage
            layers = sorted(
                int(name.split(".")[2])
                for name in self._mod_tracker.parents
                if name.count(".") >= 2 and name.split(".")[1] == "layers"
            )
            if self._mod_tracker.is_bw:
                return f"backward layer {layers[-1]}" if layers else "backward outside layers"
            if layers:
                self.layers_seen = True
                return f"forward layer {layers[-1]}"
            if self.forward_done:
                return "loss"
            return "forward after layers" if self.layers_seen else "forward before layers"

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = super().__torch_dispatch__(func, types, args, kwargs)
            total = self.current_bytes()
            name = self.phase_name()
            if total > self.phase_peaks.get(name, -1):
                self.phase_peaks[name] = total
                self.phase_categories[name] = self.categories_now()
                self.phase_ops[name] = str(func)
            if total > self._best:
                self._best, self.peak_phase = total, name
            return out

    return PhaseTracker


@contextlib.contextmanager
def staged(runtime: Any, tracker: Any) -> Iterator[None]:
    """Label the runtime's step phases on the tracker (instance attributes, removed after)."""
    names = ("forward_backward", "finish_gradients", "update", "global_loss")
    labels = {
        "forward_backward": "forward",
        "finish_gradients": "gradient reduction + clip",
        "update": "update (schedule, zero_grad)",
        "global_loss": "global loss",
    }

    def wrap(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            tracker.stage = labels[name]
            tracker.forward_done = tracker.layers_seen = False
            try:
                return method(*args, **kwargs)
            finally:
                tracker.stage = "forward"

        return call

    models = [runtime.model] if hasattr(runtime, "model") else list(runtime.modules)

    def forward_done(*_: Any) -> None:
        tracker.forward_done = True

    def next_microbatch(module: nn.Module, _: Any) -> None:
        # torch's trackers refuse a second forward of a root module (they take it for the
        # next iteration): each micro-batch after the first starts with fresh module stats
        # (the phase peaks here are kept apart from them).
        root = any(module is m for m in models)
        if root and module in tracker.memory_tracking and not tracker._mod_tracker.is_bw:
            tracker.reset_mod_stats()

    # global: runs before the trackers' own hooks if registered before they enter
    handles = [torch.nn.modules.module.register_module_forward_pre_hook(next_microbatch)]
    handles += [model.register_forward_hook(forward_done) for model in models]
    for name in names:
        setattr(runtime, name, wrap(name, getattr(runtime, name)))
    try:
        yield
    finally:
        for name in names:
            delattr(runtime, name)
        for handle in handles:
            handle.remove()


def _phase_sort_key(name: str) -> tuple[int, int, str]:
    order = [
        "forward before layers",
        "forward layer",
        "forward after layers",
        "loss",
        "backward outside layers",
        "backward layer",
        "gradient reduction + clip",
        "optimizer step",
        "update",
        "global loss",
    ]
    for position, prefix in enumerate(order):
        if name.startswith(prefix):
            index = int(name.rsplit(" ", 1)[1]) if name.split()[-1].isdigit() else 0
            if prefix == "backward layer":
                index = -index  # backward runs the last layer first
            return position, index, name
    return len(order), 0, name


# -- the trace --------------------------------------------------------------------------


def _dtype(plan: Plan) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(plan.train.dtype, torch.float32)


def host_slabs(runtime: Any) -> list[torch.Tensor]:
    """The offload pool's host slabs: all free between steps, but those of the shared RoPE
    tables' host copies (fetching on demand), which the last forward's copies still hold."""
    activations = runtime.activation_runtime
    pool = getattr(activations, "pool", None)
    free = [slab.buffer for slab in getattr(pool, "_free", [])] if pool is not None else []
    return free + activations.table_buffers()


def _predicted_breakdown(plan: Plan) -> dict[str, int]:
    """The plan's per-GPU bytes by kind, of pipeline rank 0 where the plan has ranks."""
    source: Any = plan.ranks[0] if plan.ranks else plan.memory
    keys = ("params", "grads", "optimizer", "activations", "other", "grads_pending")
    return {f"{key}_bytes": getattr(source, f"{key}_bytes") for key in keys}


def trace_plan(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    plan: Plan,
    fake: bool = True,
    predicted_phases: dict[str, int] | None = None,
    pp_rank: int = 0,
) -> TraceReport:
    """One traced step (the second) of the plan's runtime on the first rank of pipeline rank
    `pp_rank` (see the module doc).

    fake=False runs the same steps on real CPU tensors with the same trackers, which is what
    the tests check the fake trace against (feasible only at small widths).
    predicted_phases: the planner's peak per phase (planner/memory.py predict_phase_peaks),
    reported beside the traced ones."""
    from framework.runtime.fsdp import ParallelRuntime
    from framework.runtime.local import build_local_runtime
    from parallel.dims import ParallelDims

    reason = untraced_reason(plan)
    if reason is not None:
        raise UntracedLayout(reason)
    layout = plan.layout
    device = torch.device("cpu")
    dtype = _dtype(plan)
    local = layout.world_size == 1 and layout.zero_stage < 2
    notes: list[str] = []
    # the mesh is [pp, dp, sp, tp]: pipeline rank p starts at global rank p x dp x sp x tp
    rank = pp_rank * (layout.world_size // layout.pp)
    group = contextlib.nullcontext() if local else fake_process_group(layout.world_size, rank)
    with group:
        mesh = dims = None
        if not local:
            dims = ParallelDims.from_plan(plan, model_cfg, train_cfg.seq_len, layout.world_size)
            mesh = dims.build_mesh(device.type)  # real tensors: before the fake mode
        fake_mode = (
            contextlib.ExitStack()
            if not fake
            else _entered(
                _uncached_fake_mode(),
                fake_materialisation(),
                fake_storage_identity(),
                fake_mesh_concatenation(),
                static_pipeline_shapes(),
                _quiet(),
            )
        )
        with fake_mode:
            if local:
                runtime: Any = build_local_runtime(model_cfg, train_cfg, plan, device, dtype)
            else:
                assert dims is not None and mesh is not None
                runtime = ParallelRuntime(model_cfg, train_cfg, plan, dims, mesh, device, dtype)
            rows = layout.micro_batch_size * layout.num_microbatches
            shape = (rows, train_cfg.seq_len)
            inputs = torch.randint(0, model_cfg.vocab_size, shape)
            targets = torch.randint(0, model_cfg.vocab_size, shape)
            runtime.train_step(inputs, targets)  # step 1: creates the optimizer state
            # host slabs counted from the start (as Other / Inputs), subtracted below
            slabs = host_slabs(runtime)
            host_bytes = sum(slab.untyped_storage().nbytes() for slab in slabs)
            if local:
                tracker: Any = _phase_tracker(MemTracker)()
                tracker.track_external(runtime.model, runtime.optimizer, *slabs)
            elif layout.zero_stage < 2:  # replicated parameters (ZeRO-0/1): no FSDP module
                tracker = _phase_tracker(MemTracker)()
                tracker.track_external(*runtime.modules, *runtime.optimizers, *slabs)
            else:
                (model,) = runtime.modules
                (optimizer,) = runtime.optimizers
                tracker = _phase_tracker(FSDPMemTracker)(model, optimizer)
                tracker.track_inputs(tuple(slabs))
            with staged(runtime, tracker), tracker:
                runtime.train_step(inputs, targets)
                tracker.stage = "after the step"
                left_bytes = tracker.current_bytes()
                gc.collect()  # reference cycles: what only the garbage collector frees
                collected_bytes = left_bytes - tracker.current_bytes()
            runtime.close()
    if host_bytes:
        notes.append(
            f"host slabs of offloaded activations ({host_bytes} B) are fake CPU tensors like "
            "the rest: tracked from the start of step 2 (Other / Inputs) and subtracted from "
            "every traced device figure"
        )
    peak_snapshot: dict[str, int] = {}
    for device, snap in tracker.get_tracker_snapshot("peak").items():
        if device.type == "meta":  # views of existing storages (module doc): no new bytes
            continue
        for key, value in snap.items():
            name = str(getattr(key, "value", key))  # the tracker's enums by their names
            peak_snapshot[name] = peak_snapshot.get(name, 0) + value
    traced_peak = peak_snapshot.get(TOTAL_KEY, 0) - host_bytes
    rank_memory = plan.ranks[pp_rank] if plan.ranks else None
    memory = plan.memory
    predicted = _predicted_breakdown(plan)
    phases = [
        PhaseBytes(
            name,
            value - host_bytes,
            tracker.phase_categories.get(name, {}),
            tracker.phase_ops.get(name, ""),
            (predicted_phases or {}).get(name, 0),
        )
        for name, value in sorted(tracker.phase_peaks.items(), key=lambda i: _phase_sort_key(i[0]))
    ]
    return TraceReport(
        runtime=type(runtime).__name__,
        tracker=type(tracker).__mro__[1].__name__,
        world_size=layout.world_size,
        traced_rank=rank,
        predicted_peak_bytes=rank_memory.peak_bytes if rank_memory else memory.gpu_peak_bytes,
        traced_peak_bytes=traced_peak,
        peak_phase=tracker.peak_phase,
        predicted=predicted,
        traced_at_peak={k: v for k, v in peak_snapshot.items() if v},
        traced_host_bytes=host_bytes,
        predicted_host_bytes=rank_memory.host_bytes if rank_memory else 0,
        traced_after_step_bytes=left_bytes - host_bytes,
        traced_gc_bytes=collected_bytes,
        phases=phases,
        notes=notes,
    )
