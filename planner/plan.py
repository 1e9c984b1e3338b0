"""The plan: what the planner decides and the runtime executes (plan JSON, schema_version 1).

Frozen dataclasses, written and read as JSON. The plan-JSON fields docs/ARCHITECTURE.md lists
are a contract that users and scripts rely on; fields may be added, never renamed or removed.

Per-layer activation policy (see offload/): the layer's saved activations split into
- anchors: the layer input and the attention core's saved tensors (q, k, v, output,
  log-sum-exp). Token-wise recomputation regenerates everything else from them, so they are
  never recomputed token-wise; the first `anchor_offload_fraction` of their tokens live on
  the host (MEMO swaps them all: 1.0).
- token-local activations (norms, projections' inputs, SwiGLU): the first `offload_fraction`
  of tokens go to host memory, the next `recompute_fraction` are dropped and recomputed in
  backward, the rest stay on the device.
`recompute` = "selective" additionally recomputes the cheap memory-heavy ops (norm outputs,
SwiGLU product) for every token; "full" checkpoints the whole layer, keeping only its input.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from configs.checks import check_bounds, read_json_object
from configs.errors import ConfigError
from configs.schema import ClusterConfig, ModelConfig, TrainConfig
from configs.structured import to_typed

SCHEMA_VERSION = 1

Recompute = Literal["none", "selective", "full"]
PipelineSchedule = Literal[
    "none", "gpipe", "1f1b", "interleaved_1f1b", "interleaved_zero_bubble", "zbv_zero_bubble"
]
ZeroBackend = Literal["fsdp2", "deepspeed"]
StateOffload = Literal["none", "optimizer", "all"]
ActivationFetch = Literal["prefetch", "on_demand"]


@dataclass(frozen=True)
class ModelSummary:
    """The model the plan was made for (checked against the runtime's model)."""

    name: str
    num_params: int
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    ffn_size: int
    vocab_size: int


@dataclass(frozen=True)
class TrainSummary:
    """Batch shape the plan was made for."""

    seq_len: int
    global_batch_size: int
    micro_batch_size: int
    dtype: Literal["bf16", "fp32"]


@dataclass(frozen=True)
class ClusterSummary:
    """Hardware the plan was made for."""

    name: str
    num_nodes: int
    gpus_per_node: int
    gpu_memory_gib: float


@dataclass(frozen=True)
class Layout:
    """How the model and batch are laid out over ranks: world = dp * tp * pp * sp."""

    dp: int
    tp: int
    pp: int
    sp: int
    zero_stage: int
    micro_batch_size: int
    num_microbatches: int
    pp_schedule: PipelineSchedule
    zero_backend: ZeroBackend
    virtual_stages: int = 1
    """Pipeline stages per pp rank (> 1 only for interleaved and ZBV schedules)."""
    state_offload: StateOffload = "none"
    """Model states in host memory, the optimizer step on the host CPUs. "all" (FSDP2
    ZeRO-2/3, CPUOffloadPolicy): the sharded fp32 parameters, gradients and optimizer state;
    the device holds only the gathered compute-dtype parameters of the units in use.
    "optimizer" (DeepSpeed ZeRO-2/3, offload_optimizer): the fp32 master weights, Adam's
    moments and the fp32 gradient partition; the device keeps the bf16 parameters (ZeRO-3:
    their shard). "none" keeps everything on the device."""
    activation_fetch: ActivationFetch = "prefetch"
    """How offloaded activations come back in backward (offload/engine.py). "prefetch": a
    layer's host data whole when its backward starts, and the next layer's meanwhile, so the
    copies overlap compute (MEMO). "on_demand": each saved storage when autograd first
    unpacks it, nothing ahead (torch's save_on_cpu): only the tensors in use are back on the
    device, and the copies wait for nothing to hide behind."""

    def __post_init__(self) -> None:
        batches = ("micro_batch_size", "num_microbatches", "virtual_stages")
        check_bounds(self, "layout", ("dp", "tp", "pp", "sp", *batches), at_least=1)
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError("layout.zero_stage", f"got {self.zero_stage}; allowed: 0, 1, 2, 3")
        if (self.pp == 1) != (self.pp_schedule == "none"):
            raise ConfigError(
                "layout.pp_schedule", f"{self.pp_schedule!r} does not fit pp={self.pp}"
            )

    @property
    def world_size(self) -> int:
        """Ranks this layout needs."""
        return self.dp * self.tp * self.pp * self.sp

    @property
    def num_stages(self) -> int:
        """Pipeline stages in total (pp ranks x virtual stages per rank)."""
        return self.pp * self.virtual_stages


@dataclass(frozen=True)
class LayerPlan:
    """Activation policy of one decoder layer (see the module docstring)."""

    index: int
    stage: int
    offload_fraction: float
    recompute: Recompute
    recompute_fraction: float
    anchor_offload_fraction: float = 0.0

    def __post_init__(self) -> None:
        fractions = ("offload_fraction", "recompute_fraction", "anchor_offload_fraction")
        check_bounds(self, f"layers[{self.index}]", fractions, at_least=0, at_most=1)
        if self.offload_fraction + self.recompute_fraction > 1.0 + 1e-9:
            raise ConfigError(
                f"layers[{self.index}]",
                f"offload_fraction + recompute_fraction = "
                f"{self.offload_fraction + self.recompute_fraction:.4f} exceeds 1",
            )
        if self.recompute == "full" and (self.offload_fraction or self.recompute_fraction):
            raise ConfigError(
                f"layers[{self.index}]",
                "recompute=full keeps only the layer input: offload_fraction and "
                "recompute_fraction must be 0 (use anchor_offload_fraction for the input)",
            )

    @property
    def keeps_everything(self) -> bool:
        """Every saved activation stays on the device: nothing offloaded or recomputed."""
        return (
            self.recompute == "none"
            and self.offload_fraction == 0.0
            and self.recompute_fraction == 0.0
            and self.anchor_offload_fraction == 0.0
        )


@dataclass(frozen=True)
class MemoryBreakdown:
    """Predicted bytes per GPU on the most loaded pipeline stage."""

    gpu_budget_bytes: int
    gpu_peak_bytes: int
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    other_bytes: int
    host_bytes_per_node: int
    gpu_total_bytes: int = 0
    """The GPU's memory; the budget is this minus `reserved_bytes`."""
    reserved_bytes: int = 0
    """Kept free: the allocator fragmentation reserve plus the CUDA context (cuda only)."""
    host_budget_bytes_per_node: int = 0
    """Host RAM per node the plan may use (cluster.host_memory_gib minus the OS reserve)."""
    grads_pending_bytes: int = 0
    """Gradients not produced yet at the peak instant (one micro-batch per step, no
    pipeline: they appear during backward as activations are freed), so
    gpu_peak = params + grads + optimizer + activations + other - grads_pending."""


@dataclass(frozen=True)
class PipelineRankMemory:
    """Predicted bytes per GPU of one pipeline rank at its peak (planner/memory.py)."""

    pp_rank: int
    stages: tuple[int, ...]
    """Global pipeline stages this rank runs."""
    num_layers: int
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    """Saved activations of the in-flight micro-batches kept on the device (and the stage
    inputs/outputs the pipeline keeps) at the peak."""
    transient_bytes: int
    """Working set at the peak: backward temporaries, re-materialised and prefetched
    activations, gathered ZeRO-3 parameters, or the loss's logits chunk."""
    buffers_bytes: int
    """Pipeline receive buffers."""
    peak_bytes: int
    host_bytes: int
    """Offloaded activation bytes of one GPU of this rank at its peak (host RAM)."""
    staging_bytes: int = 0
    """Host bytes for the asynchronous checkpoint snapshot of this GPU's states."""
    host_states_bytes: int = 0
    """Model states of this GPU kept in host memory (layout.state_offload)."""
    grads_pending_bytes: int = 0
    """Gradients not produced yet at the peak (steps whose gradients appear during their one
    backward): peak = params + grads + optimizer + activations + other - this."""

    @property
    def other_bytes(self) -> int:
        return self.transient_bytes + self.buffers_bytes


@dataclass(frozen=True)
class TimeEstimate:
    """Predicted step time and throughput (MFU against cluster.peak_tflops)."""

    step_seconds: float
    tokens_per_second: float
    mfu: float
    compute_seconds: float = 0.0
    """Forward + backward on the busiest pipeline rank, all micro-batches."""
    recompute_seconds: float = 0.0
    """Recomputation (token-wise, selective and full) on the busiest rank."""
    exposed_transfer_seconds: float = 0.0
    """Host<->device copies not hidden behind compute, busiest rank."""
    exposed_comm_seconds: float = 0.0
    """Communication not hidden behind compute (tp, sp, pp, ZeRO), busiest rank."""
    bubble_seconds: float = 0.0
    """Pipeline bubble."""
    optimizer_seconds: float = 0.0
    """Optimizer step and end-of-step ZeRO traffic not hidden."""


@dataclass(frozen=True)
class SolverInfo:
    """How the plan was found."""

    name: str
    status: str
    solve_seconds: float
    candidates_evaluated: int
    layouts_considered: int = 0
    """Layouts enumerated; candidates_evaluated of them were solved as MILPs."""
    mip_gap: float = 0.0
    """Relative gap each MILP solve stopped at."""


@dataclass(frozen=True)
class Plan:
    """A complete memory and layout plan (plan JSON schema_version 1)."""

    model: ModelSummary
    train: TrainSummary
    layout: Layout
    layers: tuple[LayerPlan, ...]
    memory: MemoryBreakdown
    time: TimeEstimate
    solver: SolverInfo
    cluster: ClusterSummary | None = None
    ranks: tuple[PipelineRankMemory, ...] = ()
    """Predicted memory of every pipeline rank (memory holds the most loaded one)."""
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise ConfigError(
                "schema_version", f"got {self.schema_version}; this memplan reads {SCHEMA_VERSION}"
            )
        if len(self.layers) != self.model.num_layers:
            raise ConfigError(
                "layers",
                f"{len(self.layers)} entries for a model with {self.model.num_layers} layers",
            )
        for position, layer in enumerate(self.layers):
            if layer.index != position:
                raise ConfigError("layers", f"entry {position} has index {layer.index}")
            if not 0 <= layer.stage < self.layout.num_stages:
                raise ConfigError(
                    f"layers[{position}].stage",
                    f"{layer.stage} outside 0..{self.layout.num_stages - 1}",
                )
        stages = [layer.stage for layer in self.layers]
        if stages != sorted(stages):
            raise ConfigError("layers", "stages must be assigned to contiguous runs of layers")

    def to_dict(self) -> dict[str, Any]:
        """The plan as plain JSON-able data, schema_version first."""
        data = dataclasses.asdict(self)
        return {"schema_version": data.pop("schema_version"), **data}

    def to_json(self) -> str:
        """Indented JSON text."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def write(self, path: str | Path) -> None:
        """Write the plan JSON (parent directories are created)."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(self.to_json())

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Plan:
        """Validate and build a Plan from parsed JSON."""
        return to_typed(data, Plan)

    @staticmethod
    def read(path: str | Path) -> Plan:
        """Read a plan JSON; any problem is a ConfigError naming plan.path."""
        data = read_json_object(path, "plan.path")
        try:
            return Plan.from_dict(data)
        except ConfigError as exc:
            raise ConfigError("plan.path", f"{path}: {exc}") from exc


def check_plan_matches(
    plan: Plan, model: ModelConfig, cluster: ClusterConfig, train: TrainConfig
) -> None:
    """Raise ConfigError if a plan (e.g. from plan.path) does not fit this model, cluster and
    batch: the runtime executes plans, it never re-plans."""
    for key in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "ffn_size", "vocab_size"):
        planned, configured = getattr(plan.model, key), getattr(model, key)
        if planned != configured:
            raise ConfigError(
                "plan.path", f"plan has model.{key}={planned} but the model has {configured}"
            )
    if plan.layout.world_size != cluster.world_size:
        raise ConfigError(
            "plan.path",
            f"plan needs {plan.layout.world_size} ranks (dp*tp*pp*sp) but the cluster has "
            f"{cluster.world_size} (cluster.num_nodes x cluster.gpus_per_node)",
        )
    for key in ("seq_len", "global_batch_size"):
        planned, configured = getattr(plan.train, key), getattr(train, key)
        if planned != configured:
            raise ConfigError(
                f"train.{key}", f"{configured} differs from the plan's {key}={planned}"
            )
