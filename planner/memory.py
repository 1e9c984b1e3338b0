"""Predicted memory of a GIVEN plan: per pipeline rank (GPU) and per node (host RAM).

The same cost coefficients as the MILP (planner/costs.py), evaluated layer by layer with the
exact token rounding the runtime uses (planner/activations.py). `memplan profile` compares
these numbers with measurements, `memplan profile profile.mode=trace` with torch's
MemTracker at real widths (within 0-2% on every traced configuration: BENCHMARKS.md).

Peak of one GPU of pp rank p = model states (as its backend allocates them) + max over the
schedule's in-flight vectors t (planner/schedules.py) of [ sum over p's stages c of t_c x
(device-resident saved bytes of c's layers + RoPE tables + first/last-stage extras +
pipeline stage input/output) + pipeline buffers + FSDP2's gathered units + the working
set of a layer's backward or of the loss ].

When a step's gradients appear during its one backward (LayoutCosts.grads_follow_backward:
one micro-batch, no pipeline, torch's optimizer), the peak is the largest of the instants
backward_instants lists: the root's all-gather, the loss's backward, each layer's
SwiGLU-backward and last instants, the embedding's backward; the plan reports the gradients
not yet produced at that instant as grads_pending_bytes. predict_phase_peaks gives the same
instants by phase, named as the tracer names them.
"""

from __future__ import annotations

from configs.schema import Config
from planner.activations import (
    FP32_BYTES,
    LayerActivationBytes,
    LayerShape,
    layer_activation_bytes,
    token_split,
)
from planner.costs import REDUCE_BYTES, LayoutCosts, costs_for, dtype_bytes
from planner.params import ModelStateBytes, model_state_bytes, parameter_sizes
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


def _rank_inputs(
    cfg: Config,
    costs: LayoutCosts,
    stages: StageMap,
    groups: list[list[LayerPlan]],
    per_layer: list[LayerActivationBytes],
    p: int,
) -> tuple[int, ModelStateBytes, list[LayerPlan], float, list[float], list[float]]:
    """What one GPU of pp rank p holds: (parameters, model states, its layers, what it holds
    once through forward and backward, per layer in backward order its activations back
    on the device at its SwiGLU backward plus the next layer's prefetch, and that prefetch
    alone)."""
    chunk_list = stages.rank_stages[p]
    last = stages.num_stages - 1
    psi = rank_params(costs, stages, groups, p)
    sizes = [
        size
        for c in chunk_list
        for size in parameter_sizes(
            cfg.model, costs.layout.tp, len(groups[c]), first=c == 0, last=c == last
        )
    ]
    states = costs.model_states(psi, sizes)
    mine = [layer for c in chunk_list for layer in groups[c]]
    # once per rank through forward and backward: pipeline buffers, FSDP2's gathered root
    buffers = 2 * costs.boundary_bytes if costs.layout.pp > 1 else 0.0
    buffers += costs.gathered_root_bytes(list(chunk_list), stages.num_stages)
    ordered = sorted(mine, key=lambda item: item.index, reverse=True)
    back = [back_on_device_bytes(costs, layer, per_layer[layer.index]) for layer in ordered]
    fetched = [restored_bytes(costs, layer, per_layer[layer.index]) for layer in ordered]
    if costs.on_demand:  # nothing is fetched ahead
        fetched = [0.0] * len(ordered)
    fetched.append(0.0)
    rematerialised = [own + fetched[k + 1] for k, own in enumerate(back)]
    return psi, states, mine, buffers, rematerialised, fetched[1:]


def predict_phase_peaks(plan: Plan, cfg: Config) -> dict[str, int]:
    """Predicted device peak of every phase of the step that can hold the step's peak, named
    as framework/measure/trace.py names them, for a step whose gradients follow its one
    backward (one stage, one micro-batch, FSDP2 or torch's optimizer); {} otherwise."""
    costs = costs_for(cfg, plan.layout)
    if not costs.grads_follow_backward:
        return {}
    stages = StageMap.of(plan.layout, cfg.cluster.gpus_per_node)
    groups = stage_layers(plan)
    per_layer = predict_layer_activation_bytes(plan, cfg)
    _, states, mine, buffers, rematerialised, ahead = _rank_inputs(
        cfg, costs, stages, groups, per_layer, 0
    )
    constant = costs.stage_constant_bytes(0, stages.num_stages)
    peaks: dict[str, int] = {}
    for phase, act, grads, transient in backward_instants(
        costs, mine, per_layer, constant, rematerialised, buffers, ahead
    ):
        total = round(states.total - states.grads + grads + act + buffers + transient)
        peaks[phase] = max(peaks.get(phase, 0), total)
    return peaks


def back_on_device_bytes(
    costs: LayoutCosts, layer: LayerPlan, saved: LayerActivationBytes
) -> float:
    """Of one layer's activations that are not kept on the device, the bytes back on it at
    its SwiGLU-backward instant (measured with torch's MemTracker at real widths): its
    offloaded tokens (fetched before its backward) and its recomputed tensors, except that
    selective recomputation has regenerated only the SwiGLU product p by then (h1 and h2
    follow with the norms' backward).

    Fetched on demand (costs.on_demand), of its offloaded tokens only those of the SwiGLU's
    saved tensors are back by then (a, b and, without selective recomputation, p: each
    storage returns when autograd first unpacks it; the other tensors come back in their
    own ops' backward, later), and only the post-attention region has regenerated its
    recomputed tokens, from its inputs x and o, which are then back on the device whole
    (traced with torch's FSDPMemTracker: tests/unit/test_trace_accuracy.py)."""
    if costs.on_demand and layer.recompute != "full":
        back = _on_demand_back_bytes(costs, layer, saved)
    else:
        back = restored_bytes(costs, layer, saved) + saved.recomputed_bytes
    if layer.recompute == "selective":
        back -= 2 * costs.boundary_bytes  # h1 and h2: [T, H] each
    return back


def _on_demand_back_bytes(
    costs: LayoutCosts, layer: LayerPlan, saved: LayerActivationBytes
) -> float:
    """back_on_device_bytes of a split-mode layer fetched on demand (its docstring)."""
    seq = costs.seq_local
    offloaded, recomputed = token_split(seq, layer.offload_fraction, layer.recompute_fraction)
    selective = layer.recompute == "selective"
    swiglu = costs.swiglu_saved_bytes * (2 / 3 if selective else 1.0)  # p is a recipe
    back = swiglu * offloaded / seq + saved.recomputed_bytes
    if recomputed:
        # the attention region's recomputed tokens (rstd1, and h1 unless it is a recipe)
        # are not regenerated yet; the post-attention region's inputs are back whole
        rstd = costs.tokens * FP32_BYTES
        back -= (rstd + (0 if selective else costs.boundary_bytes)) * recomputed / seq
        anchors_off, _ = token_split(seq, layer.anchor_offload_fraction, 0.0)
        inputs = costs.boundary_bytes + costs.attention_output_bytes
        back += inputs * anchors_off / seq
    return back


def restored_bytes(costs: LayoutCosts, layer: LayerPlan, saved: LayerActivationBytes) -> float:
    """Bytes a layer's offloaded tokens occupy once fetched back: their own, and where its
    anchors are split between host and device, a second copy of the anchors' kept tokens
    (offload/engine.py rebuilds each anchor whole; measured with torch's MemTracker)."""
    if not layer.anchor_offload_fraction:
        return float(saved.host_bytes)
    offloaded, _ = token_split(costs.seq_local, layer.anchor_offload_fraction, 0.0)
    kept_share = (costs.seq_local - offloaded) / costs.seq_local
    return saved.host_bytes + costs.modes[layer.recompute].anchor_bytes * kept_share


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
    result = []
    for p, chunk_list in enumerate(stages.rank_stages):
        psi, states, mine, buffers, rematerialised, ahead = _rank_inputs(
            cfg, costs, stages, groups, per_layer, p
        )
        holds_last = last in chunk_list
        grads_pending = 0.0
        if costs.grads_follow_backward:  # pp = 1: one rank, one stage, one micro-batch
            constant = costs.stage_constant_bytes(0, stages.num_stages)
            instants = backward_instants(
                costs, mine, per_layer, constant, rematerialised, buffers, ahead
            )
            act, grads_live, transient = max((i[1:] for i in instants), key=sum)
            grads_pending = max(0.0, states.grads - grads_live)
        else:
            layer_phase = costs.layer_backward_bound_bytes
            phases = [layer_phase + max(rematerialised, default=0.0)]
            if holds_last:
                phases.append(costs.loss_transient_bytes + costs.zero_output_transient_bytes)
            # ZeRO-2 under FSDP2: every layer stays gathered from its forward to its backward
            gathered = costs.gathered_layer_bytes * len(mine) if lay.zero_stage == 2 else 0.0
            buffers += gathered
            best = (-1.0, 0.0, 0.0)
            for vec in stages.inflight[p]:
                act = sum(
                    count * (device[c] + costs.stage_constant_bytes(c, stages.num_stages))
                    for count, c in zip(vec, chunk_list, strict=True)
                )
                if tables_on_host(costs, mine):  # a forward in flight holds its own
                    act -= (sum(vec) - 1) * costs.chunk_saved_bytes
                for transient in phases:
                    total = act + transient
                    if total > best[0]:
                        best = (total, act, transient)
            _, act, transient = best
        host_peak = max(
            sum(count * host[c] for count, c in zip(vec, chunk_list, strict=True))
            for vec in stages.inflight[p]
        )
        if costs.on_demand and not all(layer.keeps_everything for layer in mine):
            # the RoPE tables' host copy of every forward in flight (SharedTableRecord)
            host_peak += costs.chunk_saved_bytes * max(sum(v) for v in stages.inflight[p])
        staging = round(costs.staging_bytes_per_param * psi)
        host_states = round(
            costs.host_state_bytes_per_param * psi + costs.host_state_constant_bytes
        )
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
                host_states_bytes=host_states,
                grads_pending_bytes=round(grads_pending),
            )
        )
    return result


def backward_instants(
    costs: LayoutCosts,
    layers: list[LayerPlan],
    per_layer: list[LayerActivationBytes],
    constant: float,
    rematerialised: list[float],
    root: float,
    ahead: list[float] | None = None,
) -> list[tuple[str, float, float, float]]:
    """(phase, activations, gradients, transient) at every instant that can hold the peak of
    a step whose gradients appear during its one backward (costs.grads_follow_backward),
    phases named as framework/measure/trace.py names them; `root`: the gathered root units
    (live throughout, counted by the caller), `rematerialised`: per layer in backward order,
    its activations back on the device at its SwiGLU backward and the next layer's
    prefetched ones (back_on_device_bytes); `ahead`: per layer in backward order, the next
    layer's prefetched activations alone (still there at the layer's last instant).

    Forward starts by gathering the root (FSDP2: its all-gather buffer beside the gathered
    copy). Backward runs the loss (the output layer's gradients accumulate over the logits
    chunks), then the layers from the last to the first: while layer l runs, the saved
    activations of layers 0..l, the gradients of the layers after l and of the output
    layer, l's working set (costs.layer_backward_bytes: the last layer's follows the
    output's reduce-scatter) and, outside FSDP2, l's own gradients are live; then l's
    activations (and, ZeRO-2 under FSDP2, its gathered parameters) are freed. Last the
    embedding's gradients (FSDP2: unsharded, then their fp32 reduce-scatter input).
    planner/milp.py bounds the same sequence at the boundaries of its (stage, mode)
    groups."""
    per_param = costs.grads_bytes_per_param
    layer_grads = per_param * costs.layer_params
    arriving_mlp, arriving_end = costs.arriving_grads_bytes
    zero2 = costs.layout.zero_stage == 2
    gathered = costs.gathered_layer_bytes * len(layers) if zero2 else 0.0
    acts = constant + sum(per_layer[layer.index].device_bytes for layer in layers)
    # the output layer's gradients (the embedding's, when they are tied on this stage) are
    # made by the loss's backward
    tied_grads = costs.output_is_embedding and not costs.fsdp2_units
    grads = per_param * (costs.last.params + (costs.first.params if tied_grads else 0))
    # forward starts by gathering the root: FSDP2's all-gather buffer beside the copy
    # the embedding's output beside the saved set so far; the RoPE tables made in fp32
    start = constant - costs.last.saved_bytes + costs.boundary_bytes
    start += costs.chunk_saved_bytes * FP32_BYTES / dtype_bytes(costs.dtype)
    moments = [("forward before layers", start, 0.0, root * costs.gather_copy_factor)]
    if tables_on_host(costs, layers):  # after the forward no device copy of them is left
        acts -= costs.chunk_saved_bytes
    # FSDP2 reduce-scatters the output's gradients after the loss's backward (before that
    # they are the loss's fp32 accumulator); elsewhere they are written into param.grad
    loss_grads = 0.0 if costs.fsdp2_units else grads
    loss = ("backward outside layers", acts, loss_grads, costs.loss_transient_bytes + gathered)
    moments.append(loss)
    # the final norm's backward: the loss's saved hidden states freed, the output's gradients
    # reduce-scattered (FSDP2) and the first layer in backward being gathered
    norm = costs.final_norm_backward_bytes + gathered
    hidden = acts - costs.boundary_bytes  # the loss's input, the norm's output
    moments.append(("backward outside layers", hidden, grads, norm))
    acts -= costs.last.saved_bytes  # the final norm's and the loss's, freed by their backward
    ordered = sorted(layers, key=lambda item: item.index, reverse=True)
    for position, layer in enumerate(ordered):
        first = position == 0
        # ZeRO-3 under FSDP2 prefetches the next layer; the last one in backward has none
        unfetched = costs.prefetched_layer_bytes if position == len(ordered) - 1 else 0.0
        working = costs.layer_backward_bytes(first) + rematerialised[position] + gathered
        phase = f"backward layer {layer.index}"
        moments.append((phase, acts, grads + arriving_mlp, working - unfetched))
        # the MLP norm's backward: the MLP's tensors freed (kept, fetched or recomputed)
        kept_mlp, back_mlp = mlp_freed_bytes(costs, layer)
        norm2 = costs.layer_norm2_bytes(first) + rematerialised[position] - back_mlp
        norm2 += gathered - unfetched
        arriving_norm2 = costs.arriving_norm2_grads_bytes
        moments.append((phase, acts - kept_mlp, grads + arriving_norm2, norm2))
        acts -= per_layer[layer.index].device_bytes
        end = costs.layer_end_bytes(first) + gathered - unfetched
        end += ahead[position] if ahead else 0.0
        moments.append((phase, acts, grads + arriving_end, end))
        grads += layer_grads
        if zero2:
            gathered -= costs.gathered_layer_bytes
    embedding = costs.first.params
    # FSDP2: its unsharded gradient and fp32 reduce-scatter input; a tied embedding elsewhere:
    # its dense gradient beside the loss's, and their sum (accumulated out of place)
    last_grad = (
        (dtype_bytes(costs.dtype) + REDUCE_BYTES) * embedding + costs.reduce_scatter_layer_bytes
        if costs.fsdp2_units
        else (2 * per_param * embedding if tied_grads else 0.0)
    )
    embedding_grads = grads + (0.0 if tied_grads else per_param * embedding)
    moments.append(("backward outside layers", acts, embedding_grads, last_grad))
    return moments


def mlp_freed_bytes(costs: LayoutCosts, layer: LayerPlan) -> tuple[float, float]:
    """Of one layer's MLP tensors at its SwiGLU-backward instant, (the kept ones, the ones
    back on the device: fetched or recomputed), all freed by its MLP norm's backward; net of
    the MLP norm's own saved input, which fetching on demand brings back for it."""
    seq = costs.seq_local
    mode = layer.recompute
    offloaded, recomputed = token_split(seq, layer.offload_fraction, layer.recompute_fraction)
    kept_tokens = seq if mode == "full" else seq - offloaded - recomputed
    kept = costs.mlp_saved_bytes(mode) * kept_tokens / seq
    if not costs.on_demand or mode == "full":
        return kept, costs.mlp_present_bytes(mode) - kept
    # fetched on demand (back_on_device_bytes): a, b (and p) fetched, every MLP tensor's
    # recomputed tokens regenerated; the norm's input x2 and rstd2 now fetched too
    swiglu = costs.swiglu_saved_bytes * (2 / 3 if mode == "selective" else 1.0)
    back = swiglu * offloaded / seq + costs.mlp_saved_bytes(mode) * recomputed / seq
    if mode == "selective":  # the regenerated product p, all tokens
        back += costs.swiglu_saved_bytes / 3
    back -= (costs.boundary_bytes + costs.tokens * FP32_BYTES) * offloaded / seq
    return kept, back


def tables_on_host(costs: LayoutCosts, layers: list[LayerPlan]) -> bool:
    """Whether the RoPE tables leave the device after each forward: fetching on demand,
    every layer's engine keeps them in one host copy (offload/records.py
    SharedTableRecord); a layer that keeps everything runs plain and holds them."""
    return costs.on_demand and all(not layer.keeps_everything for layer in layers)


def predict_host_bytes_per_node(plan: Plan, cfg: Config, ranks: list[PipelineRankMemory]) -> int:
    """Host RAM of the most loaded node: offloaded activations, offloaded model states and
    checkpoint staging of its GPUs (mesh order pp, dp, sp, tp: a node holds consecutive
    ranks)."""
    stages = StageMap.of(plan.layout, cfg.cluster.gpus_per_node)
    return max(
        sum(
            count * (ranks[p].host_bytes + ranks[p].host_states_bytes + ranks[p].staging_bytes)
            for p, count in enumerate(gpus)
        )
        for gpus in stages.node_gpus
    )


def zero_table_bytes(num_params: int, dp: int, zero_stage: int, dtype: str = "bf16") -> int:
    """Model-state bytes per GPU for a dense model on dp ranks (the ZeRO paper's table)."""
    return model_state_bytes(num_params, dp, zero_stage, dtype).total
