"""Sweeps over sequence lengths under the activation policies of framework/measure/trainee.py:
the longest trainable length (bench/longest_sequence.py) and tokens/s per length
(bench/throughput.py).

    point = try_length(trainee, policy, cfg, seq_len, info, steps)     # trainable?
    best, tried = longest(attempt, start, quantum, max_seq_len)      # doubling + bisection
    row = throughput_row(trainee, policy, cfg, seq_len, steps, peak_tflops)

For policy `plan` each length gets its own plan for this device (`plan_for_length`); a
length without a feasible plan is not trainable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from configs.schema import Config
from framework.measure.bench import mfu, with_seq_len
from framework.measure.device import DeviceInfo
from framework.measure.trainee import Trainee, release_memory
from planner.errors import NoFeasiblePlan
from planner.plan import Plan
from planner.units import format_bytes


@dataclass
class Point:
    """One length tried under one policy."""

    seq_len: int
    trainable: bool
    why: str
    """'' when trainable; otherwise 'OOM: ...', 'peak > budget' or 'no feasible plan'."""
    peak_bytes: int | None = None
    host_bytes: int = 0
    step_seconds: float | None = None
    plan_layout: str = ""
    predicted_peak_bytes: int | None = None
    """policy plan: the plan's gpu_peak_bytes (what the planner expected the peak to be)."""


def plan_for_length(cfg: Config, seq_len: int) -> tuple[Config, Plan | None]:
    """cfg at seq_len and the planner's plan for it (None when no plan is feasible)."""
    from planner.make import make_plan  # the MILP search: imported only where a plan is made

    cfg = with_seq_len(cfg, seq_len)
    try:
        return cfg, make_plan(cfg, explain=False)
    except NoFeasiblePlan:
        return cfg, None


def plan_summary(plan: Plan) -> str:
    """'3 layers offload, 2 recompute'."""
    layers = plan.layers
    offloading = sum(1 for p in layers if p.offload_fraction or p.anchor_offload_fraction)
    recomputing = sum(1 for p in layers if p.recompute != "none" or p.recompute_fraction)
    return f"{offloading} layers offload, {recomputing} recompute"


def try_length(
    trainee: Trainee, policy: str, cfg: Config, seq_len: int, info: DeviceInfo, steps: int
) -> Point:
    """Train `steps` steps of one seq_len-token sequence under `policy`; was it trainable?
    On an emulated device (the CPU) a measured peak above the budget is not trainable."""
    layout, predicted = "", None
    if policy == "plan":
        cfg, plan = plan_for_length(cfg, seq_len)
        if plan is None:
            return Point(seq_len, False, "no feasible plan")
        layout, predicted = plan_summary(plan), plan.memory.gpu_peak_bytes
        trainee.use_policy("plan", plan, cfg)
    elif trainee.policy != policy:
        trainee.use_policy(policy)
    result = trainee.run(seq_len, steps)
    point = Point(
        seq_len,
        result.failure is None,
        result.failure or "",
        result.device_peak_bytes,
        result.host_bytes,
        result.median_seconds,
        layout,
        predicted,
    )
    if point.trainable and info.emulated and (point.peak_bytes or 0) > info.memory_bytes:
        point.trainable, point.why = False, f"peak {format_bytes(point.peak_bytes)} > budget"
    release_memory(info.device)
    return point


def longest(
    attempt: Callable[[int], bool], start: int, quantum: int, max_seq_len: int
) -> int | None:
    """The longest length `attempt` accepts: doubling from `start` until one fails (or
    max_seq_len is passed), then bisection in steps of `quantum`; None when `start` fails.
    Assumes that a length that fails makes every longer one fail."""
    good, bad = 0, None
    length = start
    while length <= max_seq_len:
        if not attempt(length):
            bad = length
            break
        good, length = length, length * 2
    if bad is None:  # trainable up to the cap
        bad = min(length, max_seq_len + quantum)
    low, high = good // quantum, bad // quantum  # in quanta: low ok, high not
    while high - low > 1:
        middle = (low + high) // 2
        if attempt(middle * quantum):
            low = middle
        else:
            high = middle
    return low * quantum if low else None


def throughput_row(
    trainee: Trainee, policy: str, cfg: Config, seq_len: int, steps: int, peak_tflops: float
) -> dict[str, Any]:
    """One warm-up and `steps` timed steps of seq_len tokens under `policy`: the median
    step's tokens/s and MFU, or why the policy could not run the length."""
    row: dict[str, Any] = {"policy": policy, "seq_len": seq_len}
    if policy == "plan":
        cfg, plan = plan_for_length(cfg, seq_len)
        if plan is None:
            return row | {"failure": "no feasible plan"}
        row["predicted_step_seconds"] = plan.time.step_seconds
        trainee.use_policy("plan", plan, cfg)
    else:
        trainee.use_policy(policy)
    result = trainee.run(seq_len, steps + 1, track_memory=False)
    release_memory(trainee.device)
    if result.failure is not None:
        return row | {"failure": result.failure}
    timed = sorted(result.seconds[1:])  # the first step warms up (allocations, kernels)
    median = timed[len(timed) // 2]
    tokens_per_second = seq_len / median
    return row | {
        "step_seconds": median,
        "tokens_per_second": tokens_per_second,
        "mfu": mfu(cfg, seq_len, tokens_per_second, peak_tflops),
        "peak_bytes": result.device_peak_bytes,
        "host_bytes": result.host_bytes,
    }
