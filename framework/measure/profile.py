"""Run real training steps of a plan on this machine and compare memory with its predictions
(`memplan profile`, launch/profile_command.py).

    setup = profile_setup(cfg, plan, device, scale, seq_len)   # framework/measure/setup.py
    report = run_profile(setup, plan, device, steps)          # -> ProfileReport (report.py)

What runs is described in framework/measure/setup.py; each step is the runtime's train step
(framework/measure/stage_step.py over framework/runtime/step.py). Predictions come from
planner.activations for exactly the shapes that run, so predicted and measured bytes are
comparable layer by layer. Measured: per layer, the bytes the offload engine holds on the
device and on the host and the bytes it dropped for recomputation; the step peak (CUDA:
torch.cuda.max_memory_allocated; CPU: the saved bytes measured in and outside the layers
plus the model states' tensors) and the step time.
"""

from __future__ import annotations

import torch

from framework.components.model import count_parameters
from framework.measure.optimizer import MixedPrecisionAdamW, optimizer_state_tensors
from framework.measure.report import (
    LayerRow,
    ProfileReport,
    format_error,
    median_step_seconds,
    relative_error,
)
from framework.measure.setup import (
    STATE_BYTES_PER_PARAM,
    ProfileSetup,
    build_stage_model,
    most_loaded_stage,
    per_rank_model,
    profile_setup,
    scale_down,
    stage_in_flight,
)
from framework.measure.stage_step import StageStep, stage_batch, timed
from offload import ActivationRuntime, LayerActivationStats, apply_activation_plan
from parallel.stage_model import StageModel
from planner.activations import (
    LayerActivationBytes,
    LayerShape,
    layer_activation_bytes,
    outside_layers_bytes,
)
from planner.plan import Plan

__all__ = [
    "STATE_BYTES_PER_PARAM",
    "LayerRow",
    "MixedPrecisionAdamW",
    "ProfileReport",
    "ProfileSetup",
    "build_stage_model",
    "format_error",
    "median_step_seconds",
    "most_loaded_stage",
    "per_rank_model",
    "predicted_peak_bytes",
    "predicted_rows",
    "profile_setup",
    "relative_error",
    "run_profile",
    "scale_down",
    "stage_in_flight",
]


def run_profile(
    setup: ProfileSetup,
    plan: Plan,
    device: torch.device,
    steps: int,
    seed: int = 0,
    baseline: bool = False,
) -> ProfileReport:
    """Run `steps` steps with the plan's policies (and, with baseline, again without them)."""
    model = build_stage_model(setup, device, seed)
    runtime: ActivationRuntime = apply_activation_plan(
        model.layers.values(), setup.policies, fetch=plan.layout.activation_fetch
    )
    inputs, targets, grad_out = stage_batch(setup, device, seed)
    step = StageStep(model, setup, device, None if setup.last_stage else grad_out, ledger=True)
    times, peak, allocations_after_first = _timed_steps(step, inputs, targets, steps, runtime)
    layer_stats = runtime.layer_stats()
    activations = (
        sum(stats.device_bytes for stats in layer_stats.values())
        + step.saved_outside_bytes
        + runtime.shared_bytes()
    )
    params_bytes = sum(p.nbytes for p in model.parameters())
    optimizer_bytes = sum(t.nbytes for t in optimizer_state_tensors(step.optimizer))
    states = params_bytes + step.grad_bytes + optimizer_bytes
    rows = predicted_rows(setup, layer_stats)
    report = ProfileReport(
        setup=setup,
        device=str(device),
        rows=rows,
        peak_measured_bytes=peak if device.type == "cuda" else activations + states,
        peak_predicted_bytes=predicted_peak_bytes(setup, model, [row.predicted for row in rows]),
        plan_peak_bytes=plan.memory.gpu_peak_bytes,
        activation_measured_bytes=activations,
        state_measured_bytes=states,
        step_seconds=times,
        host_slab_allocations=runtime.pool.allocations if runtime.pool else 0,
        host_slab_allocations_after_first_step=allocations_after_first,
    )
    if baseline:
        runtime.remove()
        times, peak, _ = _timed_steps(step, inputs, targets, steps, None)
        report.baseline_step_seconds = times
        report.baseline_peak_bytes = peak if device.type == "cuda" else None
    return report


def _timed_steps(
    step: StageStep,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    steps: int,
    runtime: ActivationRuntime | None,
) -> tuple[list[float], int, int]:
    """Seconds per step, the CUDA peak over the steps after the first (all if only one),
    and host slabs allocated after the first step."""
    device = step.device
    times = []
    after_first = 0
    for index in range(steps):
        if device.type == "cuda" and index == min(1, steps - 1):
            torch.cuda.reset_peak_memory_stats(device)
        allocations = _slabs_allocated(runtime)
        times.append(timed(lambda: step.train_step(inputs, targets), device))
        if index > 0:
            after_first += _slabs_allocated(runtime) - allocations
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return times, peak, after_first


def _slabs_allocated(runtime: ActivationRuntime | None) -> int:
    """Host slabs the runtime's pool has allocated so far (its pool appears on first use)."""
    return runtime.pool.allocations if runtime is not None and runtime.pool else 0


def predicted_rows(
    setup: ProfileSetup, measured: dict[int, LayerActivationStats]
) -> list[LayerRow]:
    """The planner's prediction for each layer that ran, beside what was measured."""
    shape = LayerShape.of(setup.model, setup.dtype_bytes)
    rows = []
    for policy, plan_index in zip(setup.policies, setup.plan_indices, strict=True):
        predicted = layer_activation_bytes(shape, setup.micro_batch, setup.seq_local, policy)
        rows.append(LayerRow(plan_index, policy, predicted, measured[policy.index]))
    return rows


def predicted_peak_bytes(
    setup: ProfileSetup, model: StageModel, layers: list[LayerActivationBytes]
) -> int:
    """Model states (16 bytes per parameter) + the saved activations at the end of forward,
    predicted for the model that ran."""
    outside = outside_layers_bytes(
        setup.model,
        setup.micro_batch,
        setup.seq_local,
        setup.dtype_bytes,
        first_stage=setup.first_stage,
        last_stage=setup.last_stage,
    )
    states = STATE_BYTES_PER_PARAM * count_parameters(model)
    return states + outside + sum(layer.device_bytes for layer in layers)
