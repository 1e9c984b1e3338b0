"""Predicted memory of a GIVEN plan: per pipeline rank (GPU) and per node (host RAM).

The same cost coefficients as the MILP (planner/costs.py), evaluated layer by layer with the
exact token rounding the runtime uses (planner/activations.py). `memplan profile` compares
these numbers with measurements.

Peak of one GPU of pp rank p = model states + max over the schedule's in-flight vectors t
(planner/schedules.py) of [ sum over p's stages c of t_c x (device-resident saved bytes of
c's layers + RoPE tables + first/last-stage extras + pipeline stage input/output)
+ pipeline buffers + transient working set ].

When a step's gradients appear during its one backward (LayoutCosts.grads_follow_backward:
one micro-batch, no pipeline, torch's optimizer), the peak follows backward instead: the
activations still saved plus the gradients produced so far (_peak_as_gradients_arrive), and
the plan reports the gradients not yet produced at that instant as grads_pending_bytes.
"""

from __future__ import annotations

from configs.schema import Config
from planner.activations import LayerActivationBytes, LayerShape, layer_activation_bytes
from planner.costs import LayoutCosts, costs_for, dtype_bytes
from planner.params import model_state_bytes
from planner.plan import LayerPlan, PipelineRankMemory, Plan
from planner.schedules import StageMap


def stage_layers(plan: Plan) -> list[list[LayerPlan]]:
    """The plan's layers grouped by global pipeline stage."""
    groups: list[list[LayerPlan]] = [[] for _ in range(plan.layout.num_stages)]
    for layer in plan.layers:
        groups[layer.stage].append(layer)
    return groups


def predict_layer_activation_bytes(plan: Plan, cfg: Config) -> list[LayerActivationBytes]:
    """Device, host and recomputed saved bytes of every layer for ONE micro-batch on one
    rank (what a saved-tensor ledger measures per layer)."""
    lay = plan.layout
    shape = LayerShape.of(cfg.model, dtype_bytes(plan.train.dtype), lay.tp, lay.sp)
    seq_local = cfg.train.seq_len // lay.sp
    return [
        layer_activation_bytes(shape, lay.micro_batch_size, seq_local, layer)
        for layer in plan.layers
    ]


def rank_params(costs: LayoutCosts, stages: StageMap, groups: list[list[LayerPlan]], p: int) -> int:
    """Parameters held by one GPU of pp rank p (its tp shard of its stages)."""
    return sum(
        costs.layer_params * len(groups[c]) + costs.stage_extra_params(c, stages.num_stages)
        for c in stages.rank_stages[p]
    )


def _rematerialises(layers: list[LayerPlan]) -> bool:
    return not all(layer.keeps_everything for layer in layers)


def prefetch_bytes(costs: LayoutCosts, layers: list[LayerPlan]) -> float:
    """Bound on one layer's offloaded tensors fetched ahead during a backward: the largest,
    over the recompute modes that offload, of whole anchors and whole token-local tensors."""
    best = 0.0
    for mode, cost in costs.modes.items():
        group = [layer for layer in layers if layer.recompute == mode]
        anchors = any(layer.anchor_offload_fraction for layer in group)
        local = any(layer.offload_fraction for layer in group)
        best = max(best, cost.anchor_bytes * anchors + cost.local_bytes * local)
    return best


def predict_stage_memory(plan: Plan, cfg: Config) -> list[PipelineRankMemory]:
    """Predicted peak memory of one GPU of every pipeline rank, with its breakdown."""
    lay = plan.layout
    costs = costs_for(cfg, lay)
    stages = StageMap.of(lay, cfg.cluster.gpus_per_node)
    groups = stage_layers(plan)
    per_layer = predict_layer_activation_bytes(plan, cfg)
    device = [sum(per_layer[layer.index].device_bytes for layer in g) for g in groups]
    host = [sum(per_layer[layer.index].host_bytes for layer in g) for g in groups]
    last = stages.num_stages - 1
    shard = lay.dp * lay.sp
    result = []
    for p, chunk_list in enumerate(stages.rank_stages):
        psi = rank_params(costs, stages, groups, p)
        states = model_state_bytes(psi, shard, lay.zero_stage, costs.dtype)
        buffers = 2 * costs.boundary_bytes if lay.pp > 1 else 0.0
        mine = [layer for c in chunk_list for layer in groups[c]]
        phases = [
            costs.workspace_bytes
            + costs.zero_layer_transient_bytes
            + (costs.full_layer_bytes if _rematerialises(mine) else 0.0)
            + prefetch_bytes(costs, mine)
        ]
        if last in chunk_list:
            phases.append(costs.loss_transient_bytes + costs.zero_output_transient_bytes)
        grads_pending = 0.0
        if costs.grads_follow_backward:  # pp = 1: one rank, one stage, one micro-batch
            layer_transient, loss_transient = phases[0], phases[-1]
            constant = costs.stage_constant_bytes(0, stages.num_stages)
            act, grads_live, transient = _peak_as_gradients_arrive(
                costs, mine, per_layer, constant, layer_transient, loss_transient
            )
            grads_pending = max(0.0, states.grads - grads_live)
        else:
            best = (-1.0, 0.0, 0.0)
            for vec in stages.inflight[p]:
                act = sum(
                    count * (device[c] + costs.stage_constant_bytes(c, stages.num_stages))
                    for count, c in zip(vec, chunk_list, strict=True)
                )
                for transient in phases:
                    total = act + transient
                    if total > best[0]:
                        best = (total, act, transient)
            _, act, transient = best
        host_peak = max(
            sum(count * host[c] for count, c in zip(vec, chunk_list, strict=True))
            for vec in stages.inflight[p]
        )
        staging = round(costs.staging_bytes_per_param * psi)
        peak = states.total - grads_pending + act + buffers + transient
        result.append(
            PipelineRankMemory(
                pp_rank=p,
                stages=chunk_list,
                num_layers=sum(len(groups[c]) for c in chunk_list),
                params_bytes=states.params,
                grads_bytes=states.grads,
                optimizer_bytes=states.optimizer,
                activations_bytes=round(act),
                transient_bytes=round(transient),
                buffers_bytes=round(buffers),
                peak_bytes=round(peak),
                host_bytes=round(host_peak),
                staging_bytes=staging,
                grads_pending_bytes=round(grads_pending),
            )
        )
    return result


def _peak_as_gradients_arrive(
    costs: LayoutCosts,
    layers: list[LayerPlan],
    per_layer: list[LayerActivationBytes],
    constant: float,
    layer_transient: float,
    loss_transient: float,
) -> tuple[float, float, float]:
    """(activations, gradients, transient) live at the peak of a step whose gradients appear
    during its one backward (costs.grads_follow_backward).

    Backward runs the loss (the output layer's gradients accumulate over the logits chunks),
    then the layers from the last to the first: while layer l runs, the saved activations of
    layers 0..l, the gradients of the layers after l and of the output layer, l's own
    gradients and the layer working set are live; then l's activations are freed. Last the
    embedding's gradients. planner/milp.py bounds the same sequence at the boundaries of
    its (stage, mode) groups."""
    per_param = costs.grads_bytes_per_param
    layer_grads = per_param * costs.layer_params
    acts = constant + sum(per_layer[layer.index].device_bytes for layer in layers)
    grads = per_param * costs.last.params
    moments = [(acts, grads, loss_transient)]
    for layer in sorted(layers, key=lambda item: item.index, reverse=True):
        moments.append((acts, grads + layer_grads, layer_transient))
        acts -= per_layer[layer.index].device_bytes
        grads += layer_grads
    moments.append((acts, grads + per_param * costs.first.params, 0.0))
    return max(moments, key=sum)


def predict_host_bytes_per_node(plan: Plan, cfg: Config, ranks: list[PipelineRankMemory]) -> int:
    """Host RAM of the most loaded node: offloaded activations + checkpoint staging of its
    GPUs (mesh order pp, dp, sp, tp: a node holds consecutive ranks)."""
    stages = StageMap.of(plan.layout, cfg.cluster.gpus_per_node)
    return max(
        sum(count * (ranks[p].host_bytes + ranks[p].staging_bytes) for p, count in enumerate(gpus))
        for gpus in stages.node_gpus
    )


def zero_table_bytes(num_params: int, dp: int, zero_stage: int, dtype: str = "bf16") -> int:
    """Model-state bytes per GPU for a dense model on dp ranks (the ZeRO paper's table)."""
    return model_state_bytes(num_params, dp, zero_stage, dtype).total
