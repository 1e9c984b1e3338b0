"""Predicted step time, tokens/s and MFU of a GIVEN plan (planner/costs.py has the model).

Per global stage c and micro-batch:
    F_c = layers x forward + embedding (first) + final norm and loss forward (last)
          + sending the stage output (pp > 1)
    B_c = sum over layers of (backward of its mode + its token-wise recompute
          + exposed host transfer) + ZeRO-2/3 traffic not hidden + extras + sending the
          input gradient
    W_c = weight-gradient part of B_c (zero-bubble schedules)
The schedule turns stage times into a step (planner/schedules.py); the optimizer step and
end-of-step ZeRO traffic not hidden behind the last backward are added at the end.

MFU = model FLOPs per step / (step seconds x GPUs x peak), with model FLOPs per token
6 N_matmul + 6 L s n_heads head_dim (planner/flops.py); recomputation is not model FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass

from configs.schema import Config
from planner.activations import token_split
from planner.costs import LayoutCosts, costs_for
from planner.flops import training_flops_per_token
from planner.memory import predict_layer_activation_bytes, rank_params, stage_layers
from planner.plan import LayerPlan, Plan, TimeEstimate
from planner.schedules import StageMap, step_seconds


@dataclass(frozen=True)
class StageTime:
    """One global stage, one micro-batch (seconds)."""

    forward: float
    backward: float
    weight_grad: float
    compute: float
    recompute: float
    exposed_transfer: float
    exposed_comm: float

    @property
    def total(self) -> float:
        return self.forward + self.backward


def stage_time(
    costs: LayoutCosts,
    c: int,
    num_stages: int,
    layers: list[LayerPlan],
    host_bytes: list[float],
) -> StageTime:
    """Times of global stage c holding `layers` (host_bytes: each layer's offloaded bytes
    for one micro-batch)."""
    last = num_stages - 1
    fwd_layer = costs.forward_seconds
    forward = fwd_layer * len(layers)
    backward = compute = recompute = transfer = 0.0
    mode_base = costs.modes["none"].backward_seconds
    for layer, host in zip(layers, host_bytes, strict=True):
        mode = costs.modes[layer.recompute]
        _, rec_tokens = token_split(
            costs.seq_local, layer.offload_fraction, layer.recompute_fraction
        )
        token_recompute = mode.local_recompute_seconds * rec_tokens / costs.seq_local
        own = mode.backward_seconds + token_recompute
        copy = host / costs.host_link
        # fetched on demand, backward waits for each copy: nothing is in flight ahead of it
        back_exposed = copy if costs.on_demand else max(0.0, copy - own)
        exposed = max(0.0, copy - fwd_layer) + back_exposed
        backward += own + exposed
        compute += fwd_layer + mode_base
        recompute += own - mode_base
        transfer += exposed
    compute -= costs.layer_comm_seconds * len(layers)
    comm = (costs.layer_zero_exposed_seconds + costs.layer_comm_seconds) * len(layers)
    if c == 0:
        forward += costs.first.forward_seconds
        backward += costs.first.backward_seconds
        compute += costs.first.forward_seconds + costs.first.backward_seconds
        comm += costs.first.zero_exposed_seconds
    if c == last:
        forward += costs.last.forward_seconds
        backward += costs.last.backward_seconds
        compute += costs.last.forward_seconds + costs.last.backward_seconds
        comm += costs.last.zero_exposed_seconds
    if c < last:
        forward += costs.p2p_seconds
        comm += costs.p2p_seconds
    if c > 0:
        backward += costs.p2p_seconds
        comm += costs.p2p_seconds
    backward += costs.layer_zero_exposed_seconds * len(layers)
    if c == 0:
        backward += costs.first.zero_exposed_seconds
    if c == last:
        backward += costs.last.zero_exposed_seconds
    weight = costs.weight_grad_seconds * len(layers)
    weight += costs.last.weight_grad_seconds if c == last else 0.0
    return StageTime(forward, backward, weight, compute, recompute, transfer, comm)


def predict_step_time(plan: Plan, cfg: Config) -> TimeEstimate:
    """Predicted step time of `plan` with its breakdown on the busiest pipeline rank."""
    lay = plan.layout
    costs = costs_for(cfg, lay)
    stages = StageMap.of(lay, cfg.cluster.gpus_per_node)
    groups = stage_layers(plan)
    per_layer = predict_layer_activation_bytes(plan, cfg)
    times = [
        stage_time(
            costs, c, stages.num_stages, g, [per_layer[layer.index].host_bytes for layer in g]
        )
        for c, g in enumerate(groups)
    ]
    g_mb = lay.num_microbatches
    total, bubble = step_seconds(
        lay.pp_schedule,
        lay.pp,
        lay.virtual_stages,
        g_mb,
        [t.total for t in times],
        [t.forward + t.backward - 3 * t.weight_grad for t in times],
    )
    tails = []
    for p in range(lay.pp):
        psi = rank_params(costs, stages, groups, p)
        base = (costs.optimizer_seconds_per_param + costs.zero_exposed_end_seconds_per_param) * psi
        overlapped = costs.zero_overlapped_seconds_per_param * psi
        backward = sum(times[c].backward for c in stages.rank_stages[p])
        tails.append(base + max(0.0, overlapped - backward))
    tail = max(tails)
    step = total + tail
    busiest = max(range(lay.pp), key=lambda p: sum(times[c].total for c in stages.rank_stages[p]))
    mine = [times[c] for c in stages.rank_stages[busiest]]
    tokens = cfg.train.global_batch_size * cfg.train.seq_len
    flops = training_flops_per_token(cfg.model, cfg.train.seq_len) * tokens
    peak = cfg.cluster.peak_tflops * 1e12 * cfg.cluster.world_size
    return TimeEstimate(
        step_seconds=step,
        tokens_per_second=tokens / step,
        mfu=flops / (step * peak),
        compute_seconds=g_mb * sum(t.compute for t in mine),
        recompute_seconds=g_mb * sum(t.recompute for t in mine),
        exposed_transfer_seconds=g_mb * sum(t.exposed_transfer for t in mine),
        exposed_comm_seconds=g_mb * sum(t.exposed_comm for t in mine),
        bubble_seconds=bubble,
        optimizer_seconds=tail,
    )
