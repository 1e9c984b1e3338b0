"""Pipeline schedules as the planner sees them: which pp rank runs which stage, how many
micro-batches' activations each stage holds at once, and the latency model.

Stage placement (global stage index c, pp ranks, v stages per rank):
    gpipe, 1f1b                 stage c on rank c (v = 1)
    interleaved_1f1b, _zero_bubble   stage c on rank c % pp (round robin, as torch does)
    zbv_zero_bubble             stage c on rank c for c < pp, else 2 pp - 1 - c (a "V")

In-flight micro-batches are counted by replaying each rank's action order exactly as
torch.distributed.pipelining builds it (GPipe, Schedule1F1B, ScheduleInterleaved1F1B,
ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble): a forward (F) of a stage adds one
micro-batch's activations, a full backward (B) frees them; zero-bubble schedules split the
backward into input (I) and weight (W) gradients and free activations only after W. The
memory constraint is written once per distinct maximal vector of per-stage counts, so
stages whose peaks never coincide are not summed.

Latency per optimizer step with G micro-batches and per-micro-batch stage times t_c:
    pp = 1                      G t_0
    gpipe, 1f1b (Mist)          (G - 1) max_c t_c + sum_c t_c
    interleaved_1f1b            G max_p r_p + (pp - 1) max_c t_c     r_p = sum of rank p's t_c
    zero-bubble schedules       G max_p r_p + (pp - 1) max_c max(0, F_c + B_c - 3 W_c)
The zero-bubble bubble is (pp - 1)(F + I - 2W) (Qi et al., ZB-H1) with I = B - W: it vanishes
when forward, input-gradient and weight-gradient passes take equal time.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass
from typing import TypeVar

from planner.plan import Layout

T = TypeVar("T")
"""A number or an LP expression (pipeline_step)."""

SINGLE_STAGE = ("gpipe", "1f1b")
"""Pipeline schedules with one stage per pp rank (virtual_stages = 1)."""
MULTI_STAGE = ("interleaved_1f1b", "interleaved_zero_bubble", "zbv_zero_bubble")
"""Pipeline schedules with several stages per pp rank; they need num_microbatches to be a
multiple of pp (planner/layouts.py; parallel/pipeline.py maps each to its torch class)."""
INTERLEAVED = ("interleaved_1f1b", "interleaved_zero_bubble")
"""Multi-stage schedules that place stages round robin (stage c on rank c % pp)."""
ZERO_BUBBLE = ("interleaved_zero_bubble", "zbv_zero_bubble")
"""Schedules that split the backward into input and weight gradients (bubble F + B - 3W)."""


def stage_rank(stage: int, pp: int, schedule: str) -> int:
    """The pp rank that runs global stage `stage`."""
    if schedule == "zbv_zero_bubble":
        return stage if stage < pp else 2 * pp - 1 - stage
    return stage % pp


def rank_stages(rank: int, pp: int, virtual_stages: int, schedule: str) -> tuple[int, ...]:
    """Global stages of pp rank `rank`, in local order (local chunk 0 first)."""
    if schedule == "zbv_zero_bubble":
        return (rank, 2 * pp - 1 - rank)
    return tuple(j * pp + rank for j in range(virtual_stages))


def _gpipe(g: int) -> list[tuple[str, int]]:
    return [("F", 0)] * g + [("B", 0)] * g


def _one_f_one_b(rank: int, pp: int, g: int) -> list[tuple[str, int]]:
    warmup = min(g, pp - rank)
    ops = [("F", 0)] * warmup
    forwards, backwards = warmup, 0
    while backwards < g:
        ops.append(("B", 0))
        backwards += 1
        if forwards < g:
            ops.append(("F", 0))
            forwards += 1
    return ops


def _interleaved(rank: int, pp: int, v: int, g: int, zero_bubble: bool) -> list[tuple[str, int]]:
    rounds = max(1, g // pp)
    per_round = g // rounds
    factor = 1 if zero_bubble else 2
    warmup = min((v - 1) * per_round + factor * (pp - 1 - rank), g * v)
    fwd_bwd = v * g - warmup

    def fwd_chunk(step: int) -> int:
        return (step // per_round) % v

    def bwd_chunk(step: int) -> int:
        return v - 1 - ((step - warmup) // per_round) % v

    ops: list[tuple[str, int]] = []
    pending_weight: list[int] = []
    backward_ops = 0

    def backward(step: int) -> None:
        nonlocal backward_ops
        chunk = bwd_chunk(step)
        if not zero_bubble:
            ops.append(("B", chunk))
            return
        ops.append(("I", chunk))
        pending_weight.append(chunk)
        if step - warmup >= rank:  # num_1f1b_microbatches = rank
            ops.append(("W", pending_weight.pop(0)))
        backward_ops += 1

    for step in range(warmup + fwd_bwd + warmup):
        if step < warmup:
            ops.append(("F", fwd_chunk(step)))
        elif step < warmup + fwd_bwd:
            ops.append(("F", fwd_chunk(step)))
            backward(step)
        else:
            backward(step)
    ops.extend(("W", chunk) for chunk in pending_weight)
    return ops


def _zbv(rank: int, pp: int, g: int) -> list[tuple[str, int]]:
    n_micro = max(2 * pp - 1, g)
    ops: list[tuple[str, int, int]] = []  # (kind, chunk, micro-batch)
    f0 = f1 = b0 = b1 = 0
    for _ in range(2 * (pp - rank) - 1):
        ops.append(("F", 0, f0))
        f0 += 1
    for _ in range(rank):
        ops += [("F", 1, f1), ("F", 0, f0)]
        f1 += 1
        f0 += 1
    for _ in range(pp - rank):
        ops += [("F", 1, f1), ("I", 1, b1), ("W", 1, b1)]
        f1 += 1
        b1 += 1
    while f1 < f0 or f0 < n_micro:
        if f0 < n_micro:
            ops.append(("F", 0, f0))
            f0 += 1
        ops += [("I", 0, b0), ("W", 0, b0), ("F", 1, f1), ("I", 1, b1), ("W", 1, b1)]
        b0 += 1
        f1 += 1
        b1 += 1
    w0, w1 = b0, b1
    for _ in range(rank):
        ops += [("I", 0, b0), ("I", 1, b1)]
        b0 += 1
        b1 += 1
    for _ in range(pp - rank):
        ops += [("I", 0, b0), ("W", 0, w0)]
        b0 += 1
        w0 += 1
    ops += [("W", 1, mb) for mb in range(w1, b1)]
    ops += [("W", 0, mb) for mb in range(w0, b0)]
    return [(kind, chunk) for kind, chunk, mb in ops if mb < g]  # torch drops padding


def rank_actions(
    schedule: str, rank: int, pp: int, virtual_stages: int, num_microbatches: int
) -> list[tuple[str, int]]:
    """(kind, local chunk) actions of one pp rank in execution order; kinds F, B, I, W."""
    g = num_microbatches
    if schedule in ("none", "gpipe"):
        return _gpipe(g)
    if schedule == "1f1b":
        return _one_f_one_b(rank, pp, g)
    if schedule in INTERLEAVED:
        return _interleaved(rank, pp, virtual_stages, g, schedule == "interleaved_zero_bubble")
    if schedule == "zbv_zero_bubble":
        return _zbv(rank, pp, g)
    raise ValueError(f"unknown pipeline schedule {schedule!r}")


@functools.cache
def inflight_profiles(
    schedule: str, pp: int, virtual_stages: int, num_microbatches: int
) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """Per pp rank: the maximal vectors of in-flight micro-batches per local chunk.

    pp = 1 (schedule "none") runs one micro-batch at a time: ((1,),). Past a few rounds of
    pp x virtual_stages micro-batches the vectors of 1F1B, the interleaved and the zero-bubble
    schedules repeat (tests/unit/test_planner_limits.py checks it against the full replay),
    and GPipe holds all of them, so a huge batch replays only 2 x pp x virtual_stages.
    """
    if schedule == "none":
        return (((1,),),)
    steady = 2 * pp * virtual_stages  # a multiple of pp, as the schedules need
    if num_microbatches > steady:
        if schedule == "gpipe":
            return tuple(((num_microbatches,),) for _ in range(pp))
        return replayed_inflight_profiles(schedule, pp, virtual_stages, steady)
    return replayed_inflight_profiles(schedule, pp, virtual_stages, num_microbatches)


def replayed_inflight_profiles(
    schedule: str, pp: int, virtual_stages: int, num_microbatches: int
) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """inflight_profiles by replaying every action of every micro-batch (O(micro-batches))."""
    chunks = 2 if schedule == "zbv_zero_bubble" else virtual_stages
    profiles = []
    for rank in range(pp):
        live: dict[int, int] = defaultdict(int)
        seen: set[tuple[int, ...]] = set()
        for kind, chunk in rank_actions(schedule, rank, pp, virtual_stages, num_microbatches):
            if kind == "F":
                live[chunk] += 1
                seen.add(tuple(live[j] for j in range(chunks)))
            elif kind in ("B", "W"):
                live[chunk] -= 1
        maximal: list[tuple[int, ...]] = []
        for vec in sorted(seen, key=sum, reverse=True):  # a dominator has a larger sum
            if not any(all(a >= b for a, b in zip(kept, vec, strict=True)) for kept in maximal):
                maximal.append(vec)
        profiles.append(tuple(sorted(maximal)))
    return tuple(profiles)


def chunk_inflight(
    schedule: str, rank: int, pp: int, virtual_stages: int, num_microbatches: int
) -> tuple[int, ...]:
    """Most micro-batches each local chunk of pp rank `rank` holds at once (local chunk order
    of rank_stages): how many host slabs each of its layers needs."""
    profiles = inflight_profiles(schedule, pp, virtual_stages, num_microbatches)[rank]
    return tuple(max(column) for column in zip(*profiles, strict=True))


def peak_inflight(schedule: str, pp: int, virtual_stages: int, num_microbatches: int) -> int:
    """Most micro-batches any single stage holds at once (for reports)."""
    return max(
        max(max(vec) for vec in rank)
        for rank in inflight_profiles(schedule, pp, virtual_stages, num_microbatches)
    )


def step_seconds(
    schedule: str,
    pp: int,
    virtual_stages: int,
    num_microbatches: int,
    stage_seconds: list[float],
    stage_zero_bubble_seconds: list[float],
) -> tuple[float, float]:
    """(step time, bubble time) of the pipeline given each global stage's time per
    micro-batch and, for zero-bubble schedules, each stage's F + B - 3W (module docstring)."""
    g = num_microbatches
    if schedule == "none":
        return g * stage_seconds[0], 0.0
    busy = max(
        sum(stage_seconds[c] for c in rank_stages(p, pp, virtual_stages, schedule))
        for p in range(pp)
    )
    total = pipeline_step(
        schedule,
        pp,
        g,
        stage_sum=sum(stage_seconds),
        stage_max=max(stage_seconds),
        rank_max=busy,
        residue_max=max(0.0, *stage_zero_bubble_seconds),
    )
    return total, total - g * busy


def pipeline_step(
    schedule: str,
    pp: int,
    num_microbatches: int,
    stage_sum: T,
    stage_max: T,
    rank_max: T,
    residue_max: T,
) -> T:
    """The latency formula of the module docstring, from the sum and the maxima of the
    per-micro-batch stage times: the slowest stage (max_c t_c), the busiest rank
    (max_p r_p) and the largest zero-bubble residue (max_c max(0, F_c + B_c - 3 W_c)).
    Numbers (planner/bounds.py, the exact evaluation above) or LP expressions of the same
    maxima (planner/milp.py) alike."""
    g = num_microbatches
    if schedule == "none":  # one stage: stage_sum is t_0
        return g * stage_sum
    if schedule in SINGLE_STAGE:
        return (g - 1) * stage_max + stage_sum
    if schedule in ZERO_BUBBLE:
        return g * rank_max + (pp - 1) * residue_max
    if schedule in INTERLEAVED:
        return g * rank_max + (pp - 1) * stage_max
    raise ValueError(f"unknown pipeline schedule {schedule!r}")


@dataclass(frozen=True)
class StageMap:
    """Where a layout's pipeline stages live and how many micro-batches they hold."""

    num_stages: int
    rank_stages: tuple[tuple[int, ...], ...]
    """Per pp rank: its global stages in local order."""
    inflight: tuple[tuple[tuple[int, ...], ...], ...]
    """Per pp rank: maximal vectors of in-flight micro-batches per local stage."""
    node_gpus: tuple[tuple[int, ...], ...]
    """Distinct node compositions: GPUs of each pp rank on one node (mesh pp, dp, sp, tp)."""

    @staticmethod
    def of(layout: Layout, gpus_per_node: int) -> StageMap:
        pp, v, schedule = layout.pp, layout.virtual_stages, layout.pp_schedule
        stride = layout.world_size // pp
        nodes = set()
        for start in range(0, layout.world_size, gpus_per_node):
            counts = [0] * pp
            for rank in range(start, min(start + gpus_per_node, layout.world_size)):
                counts[rank // stride] += 1
            nodes.add(tuple(counts))
        return StageMap(
            num_stages=pp * v,
            rank_stages=tuple(rank_stages(p, pp, v, schedule) for p in range(pp)),
            inflight=inflight_profiles(schedule, pp, v, layout.num_microbatches),
            node_gpus=tuple(sorted(nodes)),
        )
