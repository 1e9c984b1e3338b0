"""What a DeepSpeed or accelerate config can express, as a memplan Plan, and the nearest such
configuration to a memplan plan.

Such a config is data parallel over every GPU (tp = pp = sp = 1) with one ZeRO stage, one
micro-batch size and accumulation count, one dtype, and one activation policy for every
layer: keep everything, or checkpoint the whole layer (optionally with its input in host
memory: DeepSpeed's cpu_checkpointing, accelerate's fsdp_activation_checkpointing_offload).
Token-wise offload and recomputation, per-layer mixes of policies and pipeline, sequence or
tensor parallel layouts have no counterpart there.

`equivalent_plan` builds the Plan of such settings and evaluates it with memplan's own cost
model (planner/assemble.build_plan: planner/memory.predict_stage_memory and
planner/timing.predict_step_time), so an exported or imported config is predicted exactly as
a memplan plan is. `nearest_settings` maps a memplan plan to the settings a target can
express: the same ZeRO stage where the target has it (FSDP2 has only ZeRO-2/3), the
plan's micro-batch where it divides the per-GPU batch (else the largest that does), and
the fastest of: no checkpointing, every layer checkpointed, and (when the plan offloads)
every layer checkpointed with its input in host memory, among those that fit the GPU
budget (none fits: the lowest peak).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from configs.errors import ConfigError
from configs.schema import Config
from planner.assemble import build_plan
from planner.plan import LayerPlan, Layout, Plan, SolverInfo, ZeroBackend


@dataclass(frozen=True)
class TargetSettings:
    """One DeepSpeed / accelerate configuration, in memplan's terms."""

    kind: str
    """What it is, for the user: 'DeepSpeed', 'accelerate FSDP2', 'accelerate DeepSpeed'."""
    zero_stage: int
    zero_backend: ZeroBackend
    """Whose ZeRO memory accounting applies: fsdp2 (torch FSDP) or deepspeed."""
    micro_batch_size: int
    num_microbatches: int
    """Gradient accumulation steps."""
    global_batch_size: int
    dtype: Literal["bf16", "fp32"]
    checkpointing: bool
    """Every layer checkpointed (full recomputation) or none."""
    host_layer_inputs: bool = False
    """Checkpointed layer inputs kept in host memory."""
    state_offload: bool = False
    """Model states in host RAM at ZeRO-2/3: FSDP's fsdp_offload_params (parameters,
    gradients, optimizer state), DeepSpeed's offload_optimizer (optimizer state and master
    weights)."""
    notes: tuple[str, ...] = ()
    """What was mapped or assumed, one line each."""

    def describe(self, world: int) -> str:
        """'ZeRO-2, 2 seq x 4 accumulation x 8 GPUs = 64 sequences, bf16, checkpointing off'."""
        checkpoint = "every layer checkpointed" if self.checkpointing else "no checkpointing"
        if self.checkpointing and self.host_layer_inputs:
            checkpoint += " (inputs on the host)"
        if self.state_offload:
            checkpoint += ", model states in host RAM"
        return (
            f"ZeRO-{self.zero_stage}, {self.micro_batch_size} seq x {self.num_microbatches} "
            f"accumulation x {world} GPUs = {self.global_batch_size} sequences, {self.dtype}, "
            f"{checkpoint}"
        )


def settings_config(cfg: Config, settings: TargetSettings) -> Config:
    """cfg with the settings' global batch and dtype (what the cost model reads from train.*)."""
    train = dataclasses.replace(
        cfg.train, global_batch_size=settings.global_batch_size, dtype=settings.dtype
    )
    return dataclasses.replace(cfg, train=train)


def settings_layout(settings: TargetSettings, world: int) -> Layout:
    """The settings' layout: data parallel over all `world` GPUs."""
    return Layout(
        dp=world,
        tp=1,
        pp=1,
        sp=1,
        zero_stage=settings.zero_stage,
        micro_batch_size=settings.micro_batch_size,
        num_microbatches=settings.num_microbatches,
        pp_schedule="none",
        zero_backend=settings.zero_backend,
        state_offload=(
            ("all" if settings.zero_backend == "fsdp2" else "optimizer")
            if settings.state_offload
            else "none"
        ),
    )


def settings_layers(settings: TargetSettings, num_layers: int) -> list[LayerPlan]:
    """One policy for every layer: keep everything, or full recomputation."""
    host_inputs = settings.checkpointing and settings.host_layer_inputs
    return [
        LayerPlan(
            index=i,
            stage=0,
            offload_fraction=0.0,
            recompute="full" if settings.checkpointing else "none",
            recompute_fraction=0.0,
            anchor_offload_fraction=1.0 if host_inputs else 0.0,
        )
        for i in range(num_layers)
    ]


def equivalent_plan(cfg: Config, settings: TargetSettings) -> Plan:
    """The memplan Plan of the settings on cfg's model, cluster and sequence length, with its
    predicted memory and time (memplan's cost model)."""
    world = cfg.cluster.world_size
    if settings.micro_batch_size * settings.num_microbatches * world != settings.global_batch_size:
        raise ConfigError(
            "train.global_batch_size",
            f"{settings.global_batch_size} != {settings.micro_batch_size} micro x "
            f"{settings.num_microbatches} accumulation x {world} GPUs",
        )
    solver = SolverInfo(
        name=settings.kind, status="given", solve_seconds=0.0, candidates_evaluated=0
    )
    return build_plan(
        settings_config(cfg, settings),
        settings_layout(settings, world),
        settings_layers(settings, cfg.model.num_layers),
        solver,
    )


def fits(plan: Plan) -> bool:
    """The predicted peak per GPU is within the GPU budget, and host RAM per node within
    the host budget."""
    m = plan.memory
    host_ok = (
        not m.host_budget_bytes_per_node or m.host_bytes_per_node <= m.host_budget_bytes_per_node
    )
    return m.gpu_peak_bytes <= m.gpu_budget_bytes and host_ok


def expressible(layer: LayerPlan) -> bool:
    """A policy these configs have: keep everything, or checkpoint the layer (its input on
    the device or on the host)."""
    return layer.keeps_everything or (
        layer.recompute == "full" and layer.anchor_offload_fraction in (0.0, 1.0)
    )


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, max(limit, 1)) + 1) if n % d == 0)


def target_zero(plan: Plan, backend: ZeroBackend) -> tuple[int, list[str]]:
    """The plan's ZeRO stage as the backend expresses it (FSDP2: 2 or 3)."""
    stage = plan.layout.zero_stage
    if backend == "fsdp2" and stage in (0, 1):  # FSDP2 always shards the states it holds
        return 2, [f"ZeRO-{stage} -> ZeRO-2 (the least sharding FSDP2 has)"]
    return stage, []


def nearest_settings(plan: Plan, cfg: Config, kind: str, backend: ZeroBackend) -> TargetSettings:
    """The configuration `kind` can express that is nearest to `plan` (see the module doc):
    its notes say what changed. ConfigError if the global batch cannot be split over every
    GPU (data parallel is all such a config has)."""
    world = cfg.cluster.world_size
    total = plan.train.global_batch_size
    if total % world:
        raise ConfigError(
            "train.global_batch_size",
            f"{total} sequences do not split evenly over {world} data-parallel GPUs, which a "
            f"{kind} config needs (micro x accumulation x GPUs = the global batch); allowed: a "
            f"multiple of {world}",
        )
    lay = plan.layout
    zero, notes = target_zero(plan, backend)
    if lay.zero_backend != backend:
        notes.append(f"zero_backend {lay.zero_backend} -> {backend} (whose ZeRO the file runs)")
    if (lay.tp, lay.pp, lay.sp) != (1, 1, 1):
        notes.append(
            f"tp{lay.tp} pp{lay.pp} sp{lay.sp} -> data parallel over {world} GPUs (no tensor, "
            "pipeline or sequence parallelism)"
        )
    micro = _largest_divisor_at_most(total // world, lay.micro_batch_size)
    if micro != lay.micro_batch_size:
        notes.append(
            f"micro-batch {lay.micro_batch_size} -> {micro} (divides {total // world} per GPU)"
        )
    policies = {dataclasses.replace(layer, index=0) for layer in plan.layers}
    if len(policies) > 1 or not expressible(plan.layers[0]):
        notes.append(
            "per-layer token-wise offload / recomputation / selective policies -> one policy "
            "for every layer (checkpoint all or none)"
        )
    base = TargetSettings(
        kind=kind,
        zero_stage=zero,
        zero_backend=backend,
        micro_batch_size=micro,
        num_microbatches=total // (world * micro),
        global_batch_size=total,
        dtype=plan.train.dtype,
        checkpointing=False,
    )
    candidates = [base, dataclasses.replace(base, checkpointing=True)]
    if any(layer.anchor_offload_fraction or layer.offload_fraction for layer in plan.layers):
        # the plan offloads activations: checkpointed layer inputs on the host is the nearest
        candidates.append(dataclasses.replace(base, checkpointing=True, host_layer_inputs=True))
    if lay.state_offload != "none":
        if zero >= 2:  # the plan's states live in host RAM: so may the target's
            candidates += [dataclasses.replace(s, state_offload=True) for s in candidates]
        else:
            notes.append(f"model states in host RAM -> on the device (ZeRO-{zero} offloads none)")
    evaluated = [(equivalent_plan(cfg, s), s) for s in candidates]
    fitting = [(p, s) for p, s in evaluated if fits(p)]
    if fitting:
        chosen = min(fitting, key=lambda item: item[0].time.step_seconds)[1]
    else:
        chosen = min(evaluated, key=lambda item: item[0].memory.gpu_peak_bytes)[1]
        notes.append("no expressible policy fits the GPU budget: the lowest peak is exported")
    return dataclasses.replace(chosen, notes=tuple(notes))
