"""From a MILP solution to a Plan: per-layer policies snapped to whole tokens, then the
plan's predicted memory and time from the exact evaluators (planner/memory.py,
planner/timing.py), so a plan reports the cost of exactly what the runtime will execute."""

from __future__ import annotations

import dataclasses
import math
from typing import TypeVar

from configs.schema import Config
from planner.costs import costs_for
from planner.memory import predict_host_bytes_per_node, predict_stage_memory
from planner.modes import SPLIT_MODES, STAGE_LAYER_ORDER
from planner.params import total_params
from planner.plan import (
    ClusterSummary,
    LayerPlan,
    Layout,
    MemoryBreakdown,
    ModelSummary,
    Plan,
    SolverInfo,
    TimeEstimate,
    TrainSummary,
)
from planner.solution import StageChoice
from planner.timing import predict_step_time
from planner.units import GIB

NOISE = 1e-6
"""Fractions below this are solver noise."""
T = TypeVar("T")


def _snap(fraction_sum: float, layers: int, tokens: int) -> int:
    """Tokens per layer for a group's fraction sum, rounded up (never keeps more on the
    device than the MILP planned)."""
    mean = fraction_sum / layers
    if mean < NOISE:
        return 0
    return min(tokens, math.ceil(mean * tokens - NOISE * tokens))


def layer_policies(choices: tuple[StageChoice, ...], seq_local: int) -> list[LayerPlan]:
    """Per-layer plans from the MILP's per-(stage, mode) groups: every layer of a group gets
    the group's mean fractions, snapped up to whole tokens (planner/activations.token_split
    reproduces the token counts exactly)."""
    layers: list[LayerPlan] = []
    for stage, choice in enumerate(choices):
        for mode in STAGE_LAYER_ORDER:
            count = choice.layers[mode]
            if count <= 0:
                continue
            anchor = _snap(choice.anchor_offload_sum[mode], count, seq_local)
            offload = recompute = 0
            if mode in SPLIT_MODES:
                offload = _snap(choice.offload_sum[mode], count, seq_local)
                both = choice.offload_sum[mode] + choice.recompute_sum[mode]
                recompute = max(0, _snap(both, count, seq_local) - offload)
            for _ in range(count):
                layers.append(
                    LayerPlan(
                        index=len(layers),
                        stage=stage,
                        offload_fraction=offload / seq_local,
                        recompute=mode,
                        recompute_fraction=recompute / seq_local,
                        anchor_offload_fraction=anchor / seq_local,
                    )
                )
    return layers


def _same_names(cls: type[T], source: object, **values: object) -> T:
    """A `cls` dataclass with `values`, and every other field read from `source`'s attribute
    of the same name."""
    fields = [f.name for f in dataclasses.fields(cls) if f.name not in values]
    return cls(**{name: getattr(source, name) for name in fields}, **values)


def _summaries(cfg: Config, layout: Layout, dtype: str) -> dict:
    """The model, batch and cluster the plan is made for (Plan's summary fields)."""
    return {
        "model": _same_names(ModelSummary, cfg.model, num_params=total_params(cfg.model)),
        "train": _same_names(
            TrainSummary, cfg.train, micro_batch_size=layout.micro_batch_size, dtype=dtype
        ),
        "cluster": _same_names(ClusterSummary, cfg.cluster),
    }


def build_plan(cfg: Config, layout: Layout, layers: list[LayerPlan], solver: SolverInfo) -> Plan:
    """A complete Plan for `layout` and per-layer policies, with predicted memory and time."""
    costs = costs_for(cfg, layout)
    draft = Plan(
        layout=layout,
        layers=tuple(layers),
        memory=MemoryBreakdown(0, 0, 0, 0, 0, 0, 0, 0),
        time=TimeEstimate(0.0, 0.0, 0.0),
        solver=solver,
        **_summaries(cfg, layout, costs.dtype),
    )
    ranks = predict_stage_memory(draft, cfg)
    top = max(ranks, key=lambda r: r.peak_bytes)
    memory = _same_names(  # params, grads, optimizer, activations, other, grads_pending
        MemoryBreakdown,
        top,
        gpu_budget_bytes=costs.budget_bytes,
        gpu_peak_bytes=top.peak_bytes,
        host_bytes_per_node=predict_host_bytes_per_node(draft, cfg, ranks),
        gpu_total_bytes=int(cfg.cluster.gpu_memory_gib * GIB),
        reserved_bytes=costs.reserved_bytes,
        host_budget_bytes_per_node=costs.host_budget_bytes,
    )
    with_memory = dataclasses.replace(draft, memory=memory, ranks=tuple(ranks))
    return dataclasses.replace(with_memory, time=predict_step_time(with_memory, cfg))
