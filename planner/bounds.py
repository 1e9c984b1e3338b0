"""Closed-form lower bounds of one layout, cheap enough for every enumerated layout.

Time: every layer without recompute or exposed transfer, the integer layer split that
minimises the slowest stage (and, separately, the busiest pipeline rank and the largest
zero-bubble residue) exactly, and the schedule's latency formula with those maxima
(planner/schedules.py). Policies only ever add time to a stage, so the three maxima are also
valid cuts for the MILP. Memory: the busiest pipeline rank's model states (the integer layer
split that minimises them) + one layer's activations + the backward working set, and on one
stage the instants every plan reaches (the last layer's and the first layer's backward).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

from planner.costs import LayoutCosts
from planner.schedules import pipeline_step, stage_rank


def _min_max_load(bases: list[float], per_item: float, items: int, at_least: int) -> float:
    """Smallest possible maximum of base_i + n_i x per_item over bins i with n_i >= at_least
    and sum n_i = items. Identical items: fill every bin up to the water level the items
    could at least reach, then place the rest one by one on the least-loaded bin."""
    loads = [base + at_least * per_item for base in bases]
    spare = items - at_least * len(bases)
    if per_item <= 0 or spare <= 0:
        return max(loads)
    loads.sort()
    total = 0.0
    for k, load in enumerate(loads):  # water level over the k + 1 lowest bins
        total += load
        level = (spare * per_item + total) / (k + 1)
        if k + 1 == len(loads) or level <= loads[k + 1]:
            break
    for i in range(k + 1):
        fill = max(0, math.floor((level - loads[i]) / per_item))
        loads[i] += fill * per_item
        spare -= fill
    heapq.heapify(loads)
    for _ in range(spare):
        heapq.heappush(loads, heapq.heappop(loads) + per_item)
    return max(loads)


@dataclass(frozen=True)
class Bounds:
    """Lower bounds of one layout: step time, per-GPU memory, and the three pipeline maxima
    (slowest stage, busiest rank, largest zero-bubble residue) per micro-batch. The maxima
    are valid cuts for the MILP: policies only ever add time to a stage."""

    time: float
    memory: float
    stage_max: float
    rank_max: float
    residue_max: float
    host_memory: float = 0.0
    """Host bytes of the most loaded node that no activation policy removes: offloaded
    model states and checkpoint staging of its GPUs (its lightest rank's share at least)."""


def bounds(costs: LayoutCosts, num_layers: int) -> Bounds:
    """Closed-form lower bounds of a layout.

    Time: every layer without recompute or exposed transfer, and the integer layer split
    that minimises the slowest stage (and the busiest rank) exactly; the schedule's formula
    with those maxima. Memory: the busiest rank's model states + one layer's activations +
    the backward working set (module docstring). Host: the host-resident states of a node's
    GPUs, each holding at least its lightest rank's parameters.
    """
    lay = costs.layout
    S, L, G, pp = lay.num_stages, num_layers, lay.num_microbatches, lay.pp
    first, last = costs.first, costs.last
    none = costs.modes["none"]
    per_layer = costs.forward_seconds + none.backward_seconds + costs.layer_zero_exposed_seconds
    residue = per_layer - 3 * costs.weight_grad_seconds  # zero-bubble F + B - 3W per layer
    base = [costs.p2p_seconds * ((c > 0) + (c < S - 1)) for c in range(S)]
    base[0] += first.forward_seconds + first.backward_seconds + first.zero_exposed_seconds
    base[-1] += last.forward_seconds + last.backward_seconds + last.zero_exposed_seconds
    residue_base = list(base)
    residue_base[-1] -= 3 * last.weight_grad_seconds
    total = L * per_layer + sum(base)
    stage_max = _min_max_load(base, per_layer, L, 1)
    rank_base = [0.0] * pp
    for c in range(S):
        rank_base[stage_rank(c, pp, lay.pp_schedule)] += base[c]
    rank_max = _min_max_load(rank_base, per_layer, L, lay.virtual_stages)
    if residue > 0:
        residue_max = _min_max_load(residue_base, residue, L, 1)
    else:  # each stage holds at most L - S + 1 layers
        residue_max = max(b + residue * (L - S + 1) for b in residue_base)
    residue_max = max(0.0, residue_max)
    step = pipeline_step(lay.pp_schedule, pp, G, total, stage_max, rank_max, residue_max)
    psi = L * costs.layer_params + first.params + last.params
    tail = (costs.optimizer_seconds_per_param + costs.zero_exposed_end_seconds_per_param) * psi
    # the busiest rank's states: the integer layer split that minimises the largest
    # (first/last-stage extras + layers) over the ranks
    rank_extras = [0.0] * pp
    for c in range(S):
        rank_extras[stage_rank(c, pp, lay.pp_schedule)] += costs.stage_extra_params(c, S)
    busiest = _min_max_load(rank_extras, costs.layer_params, L, lay.virtual_stages)
    states = costs.state_bytes_per_param * busiest
    # the SwiGLU-backward instant of a layer with its activations (kept or recomputed),
    # beside the gathered root on one stage; ZeRO-2 under FSDP2 keeps a rank's layers
    # gathered from their forward to their backward
    working = min(costs.layer_backward_bytes(True), costs.layer_backward_bytes(False))
    gathered = costs.gathered_layer_bytes * L / pp if lay.zero_stage == 2 else 0.0
    root = costs.gathered_root_bytes([0], 1) if pp == 1 else 0.0
    instants = [(0, working + gathered)]  # (gradients not yet produced, working set)
    if pp == 1 and costs.grads_follow_backward:  # instants every plan reaches
        one = costs.gathered_layer_bytes if lay.zero_stage == 2 else 0.0
        instants = [
            (psi - last.params, costs.layer_backward_bytes(True) + gathered),  # the last layer
            (first.params + costs.layer_params, costs.layer_backward_bytes(False) + one),
        ]
    per = costs.grads_bytes_per_param
    # one layer's activations at its SwiGLU-backward instant: all of them, fetched ahead or
    # kept (planner/memory.py back_on_device_bytes); fetched on demand, at least the SwiGLU's
    one_layer = costs.swiglu_saved_bytes if costs.on_demand else costs.full_layer_bytes
    memory = states + root + one_layer
    memory += max(working_set - per * pending for pending, working_set in instants)
    # host RAM: every GPU of a node holds the host-resident states of its rank's parameters;
    # the lightest rank holds all of them (pp = 1) or at least one layer per local stage
    lightest = psi if pp == 1 else costs.layer_params * lay.virtual_stages
    node_gpus = min(costs.gpus_per_node, lay.world_size)
    # (the constant's root-tensor share only where every rank holds the root: pp = 1)
    constant = costs.host_state_constant_bytes if pp == 1 else 0.0
    host = (costs.host_resident_bytes_per_param * lightest + constant) * node_gpus
    return Bounds(step + tail / pp, memory, stage_max, rank_max, residue_max, host)
