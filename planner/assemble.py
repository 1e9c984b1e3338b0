"""From a MILP solution to a Plan: per-layer policies snapped to whole tokens, then the
plan's predicted memory and time from the exact evaluators (planner/memory.py,
planner/timing.py), so a plan reports the cost of exactly what the runtime will execute."""

from __future__ import annotations

import dataclasses
import math

from configs.schema import Config
from planner.costs import costs_for
from planner.memory import predict_host_bytes_per_node, predict_stage_memory
from planner.milp import StageChoice
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
from planner.timing import predict_step_time
from planner.units import GIB

MODE_ORDER = ("full", "selective", "none")
"""Order of a stage's layers by recompute mode in the emitted plan."""
NOISE = 1e-6
"""Fractions below this are solver noise."""


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
        for mode in MODE_ORDER:
            count = choice.layers[mode]
            if count <= 0:
                continue
            anchor = _snap(choice.anchor_offload_sum[mode], count, seq_local)
            offload = recompute = 0
            if mode != "full":
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


def _summaries(cfg: Config, layout: Layout, dtype: str) -> dict:
    m = cfg.model
    return {
        "model": ModelSummary(
            name=m.name,
            num_params=total_params(m),
            num_layers=m.num_layers,
            hidden_size=m.hidden_size,
            num_heads=m.num_heads,
            num_kv_heads=m.num_kv_heads,
            ffn_size=m.ffn_size,
            vocab_size=m.vocab_size,
        ),
        "train": TrainSummary(
            seq_len=cfg.train.seq_len,
            global_batch_size=cfg.train.global_batch_size,
            micro_batch_size=layout.micro_batch_size,
            dtype=dtype,
        ),
        "cluster": ClusterSummary(
            name=cfg.cluster.name,
            num_nodes=cfg.cluster.num_nodes,
            gpus_per_node=cfg.cluster.gpus_per_node,
            gpu_memory_gib=cfg.cluster.gpu_memory_gib,
        ),
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
    memory = MemoryBreakdown(
        gpu_budget_bytes=costs.budget_bytes,
        gpu_peak_bytes=top.peak_bytes,
        params_bytes=top.params_bytes,
        grads_bytes=top.grads_bytes,
        optimizer_bytes=top.optimizer_bytes,
        activations_bytes=top.activations_bytes,
        other_bytes=top.other_bytes,
        host_bytes_per_node=predict_host_bytes_per_node(draft, cfg, ranks),
        gpu_total_bytes=int(cfg.cluster.gpu_memory_gib * GIB),
        reserved_bytes=costs.reserved_bytes,
        host_budget_bytes_per_node=costs.host_budget_bytes,
        grads_pending_bytes=top.grads_pending_bytes,
    )
    with_memory = dataclasses.replace(draft, memory=memory, ranks=tuple(ranks))
    return dataclasses.replace(with_memory, time=predict_step_time(with_memory, cfg))
