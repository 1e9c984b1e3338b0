"""The cost model: bytes and seconds of one decoder layer (per recompute mode), of the parts
outside the layers, and of communication, for one layout. Pure functions of the configs; the
MILP (planner/milp.py) and the evaluator of a finished plan (planner/memory.py,
planner/timing.py) read the same numbers, so a plan's reported cost is the cost it was
optimised for.

Per micro-batch on one rank: T = micro_batch x seq_len / sp local tokens, s = seq_len,
a = dtype bytes, H hidden, F = ffn / tp, q = heads / tp x head_dim, kv = kv_heads / tp x
head_dim, P = the layer's matmul weights / tp.

Compute (seconds = FLOPs / (peak x efficiency), bytes / (bandwidth x efficiency)):
    forward     2 T P matmul + 2 T s q causal attention + T a (10H + 3F + 2q + 2kv) element-wise
    backward    2x the matmuls, 2.5x the attention (FlashAttention recomputes QK^T), 2x element-wise
    weight grad (zero-bubble W pass) 1x the matmuls
    token-wise recompute of every token's local part: wo, w1, w3 matmuls 2 T (qH + 2HF)
                + norms, residual and SwiGLU T a (8H + 3F) (+ one tp all-reduce of T H a)
    selective   recomputes h1, h2 and the SwiGLU product for all tokens: T a (4H + 3F)
    full        runs the whole forward again
Communication (bus bandwidth of the group; intra-node when the group fits in a node with the
mesh order (pp, dp, sp, tp), tp innermost; every collective and p2p transfer also costs
planner.collective_latency_seconds):
    tp          2 all-reduces of T H a forward, 2 backward, 2 (tp-1)/tp x bytes each
    sp          Ulysses all-to-all of q, k, v and the output, forward and backward, (sp-1)/sp
    pp          the stage output T H a forward and its gradient backward, per micro-batch
    ZeRO        over the dp x sp ranks, f = (N-1)/N:
                  3  all-gather f Psi a per layer forward, all-gather + reduce-scatter backward,
                     hidden behind that layer's compute, the rest exposed
                  2  reduce-scatter f Psi a per layer backward (hidden likewise), all-gather of
                     the updated parameters after the optimizer step (exposed)
                  1  reduce-scatter at the end of the last backward (overlaps it), all-gather
                  0  all-reduce 2 f Psi a at the end of the last backward (overlaps it)
Host transfers: a layer's offloaded bytes go out during its forward and come back during the
backward of the layer after it; what does not fit behind that compute is exposed.

Transient working set on a rank (beyond the states and the in-flight saved activations):
    backward of a layer   T a (6F + 4H) gradient temporaries (the SwiGLU backward's F-wide
                          tensors dominate) + the layer's own offloaded/recomputed tensors back
                          on the device + the next layer's prefetched tensors (<= one whole
                          layer each; only on ranks that offload or recompute anything)
                          + ZeRO-3: two gathered layers and one unsharded gradient;
                          ZeRO-2: one unsharded layer gradient
    loss (last stage)     min(loss_chunk_tokens, T) x vocab x (a + 8) logits chunk in the
                          dtype and fp32 + the fp32 [vocab, H] gradient accumulator
                          + ZeRO-3: the gathered output projection
Pipeline stages also hold each in-flight micro-batch's stage input and output (T H a each:
torch.distributed.pipelining keeps them for the backward).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from configs.schema import ClusterConfig, Config, ModelConfig, PlannerConfig, TrainConfig
from planner.activations import FP32_BYTES, LayerShape, outside_layers_bytes
from planner.params import StateBytesPerParam, param_counts
from planner.plan import Layout
from planner.units import GIB

MODES = ("none", "selective", "full")
ADAM_BYTES_PER_PARAM = 28
"""Optimizer step traffic per parameter of the optimizer shard: fp32 master (or fp32 params),
m and v read and written (24) + the gradient read and the parameter written."""
WORKSPACE_FFN_TENSORS = 6
WORKSPACE_HIDDEN_TENSORS = 4


def training_dtype(cluster: ClusterConfig, train: TrainConfig) -> str:
    """The compute dtype the runtime uses: train.dtype, auto = bf16 on cuda, fp32 on cpu."""
    if train.dtype != "auto":
        return train.dtype
    return "bf16" if cluster.device == "cuda" else "fp32"


def dtype_bytes(dtype: str) -> int:
    return 2 if dtype == "bf16" else 4


def offload_enabled(cluster: ClusterConfig, planner: PlannerConfig) -> bool:
    """planner.offload, where auto means on for cuda clusters only."""
    if planner.offload == "auto":
        return cluster.device == "cuda"
    return planner.offload == "on"


def gpu_budget_bytes(cluster: ClusterConfig, planner: PlannerConfig) -> tuple[int, int]:
    """(usable bytes per GPU, reserved bytes): memory minus the fragmentation reserve and,
    on cuda, the CUDA context."""
    total = int(cluster.gpu_memory_gib * GIB)
    context = int(planner.cuda_context_gib * GIB) if cluster.device == "cuda" else 0
    reserved = int(total * planner.fragmentation_reserve_fraction) + context
    return total - reserved, reserved


def host_budget_bytes(cluster: ClusterConfig, planner: PlannerConfig) -> int:
    """Host RAM per node the plan may use (minus the OS/runtime reserve)."""
    return int(cluster.host_memory_gib * GIB * (1.0 - planner.host_reserve_fraction))


@dataclass(frozen=True)
class Rates:
    """Achievable rates of one GPU and its links (units: FLOP/s and bytes/s)."""

    matmul: float
    attention: float
    memory: float
    host_link: float
    intra_node: float
    inter_node: float
    layer_overhead_seconds: float

    @staticmethod
    def of(cluster: ClusterConfig, planner: PlannerConfig) -> Rates:
        peak = cluster.peak_tflops * 1e12
        return Rates(
            matmul=peak * planner.matmul_efficiency,
            attention=peak * planner.attention_efficiency,
            memory=cluster.hbm_bandwidth_gbps * 1e9 * planner.memory_bandwidth_efficiency,
            host_link=cluster.host_to_device_gbps * 1e9 * planner.host_transfer_efficiency,
            intra_node=cluster.intra_node_gbps * 1e9 * planner.network_efficiency,
            inter_node=cluster.inter_node_gbps * 1e9 * planner.network_efficiency,
            layer_overhead_seconds=planner.layer_overhead_seconds,
        )

    def link(self, within_node: bool) -> float:
        return self.intra_node if within_node else self.inter_node


@dataclass(frozen=True)
class ModeCost:
    """One decoder layer in one recompute mode, one micro-batch, one rank."""

    anchor_bytes: float
    """Anchors: layer input + attention core tensors (only the input for full); each token
    kept on the device or, for anchor_offload_fraction of them, on the host."""
    local_bytes: float
    """Token-local saved tensors of all tokens (0 for full): kept, offloaded or recomputed."""
    backward_seconds: float
    """Backward including the mode's own recomputation (selective ops, or the whole forward)."""
    local_recompute_seconds: float
    """Recomputing the token-local tensors of every token (scaled by recompute_fraction)."""


@dataclass(frozen=True)
class LayoutCosts:
    """Everything the MILP and the evaluator need for one layout (per micro-batch, per rank
    unless said otherwise)."""

    layout: Layout
    dtype: str
    seq_local: int
    tokens: int
    modes: dict[str, ModeCost]
    forward_seconds: float
    weight_grad_seconds: float
    layer_comm_seconds: float
    """tp all-reduces and Ulysses all-to-alls of one layer, forward + backward (inside
    forward_seconds and the modes' backward_seconds; reported as communication)."""
    full_layer_bytes: float
    layer_params: int
    state_bytes_per_param: float
    """Model-state bytes per parameter on one GPU after ZeRO sharding (exact division)."""
    grads_bytes_per_param: float
    """The gradients' part of state_bytes_per_param."""
    grads_follow_backward: bool
    """The step's gradients appear during its one backward, layer by layer, as the layers'
    saved activations are freed, so the peak never holds all of both: one micro-batch per
    step, no pipeline, and a torch optimizer whose gradients are dropped after every step
    (zero_backend fsdp2 and the one-process runtime). With a second micro-batch or pipeline
    stages, forwards run while earlier gradients are held; DeepSpeed keeps its gradient
    buffers between steps."""
    staging_bytes_per_param: float
    """Checkpoint staging (params + optimizer shard) on the host per parameter, or 0."""
    optimizer_seconds_per_param: float
    zero_overlapped_seconds_per_param: float
    """ZeRO-0/1 end-of-step gradient traffic that overlaps the last backward."""
    zero_exposed_end_seconds_per_param: float
    """ZeRO-1/2 parameter all-gather after the optimizer step (exposed)."""
    layer_zero_exposed_seconds: float
    """ZeRO-2/3 per-layer communication not hidden behind the layer's compute."""
    first: StageExtra
    last: StageExtra
    chunk_saved_bytes: float
    """Saved bytes every stage holds per micro-batch (the RoPE tables)."""
    boundary_bytes: float
    """One [T, H] hidden-state tensor: a pipeline stage's input or output."""
    p2p_seconds: float
    workspace_bytes: float
    zero_layer_transient_bytes: float
    loss_transient_bytes: float
    zero_output_transient_bytes: float
    budget_bytes: int
    reserved_bytes: int
    host_budget_bytes: int
    offload: bool
    full_recompute: bool
    """Whole-layer recomputation runs in this layout: not under DeepSpeed ZeRO-3, whose
    engine has released the parameters the recomputed layer needs by backward (the runtime
    refuses such a plan: parallel/dims.py)."""
    host_link: float
    """Host<->device copy bytes/s of one GPU, each direction."""
    gpus_per_node: int

    @property
    def states_per_param(self) -> StateBytesPerParam:
        return StateBytesPerParam.of(self.dtype)

    def mode_host_bytes(self, mode: str, offload: float, anchor_offload: float) -> float:
        cost = self.modes[mode]
        return cost.anchor_bytes * anchor_offload + cost.local_bytes * offload

    def mode_device_bytes(
        self, mode: str, offload: float, recompute: float, anchor_offload: float
    ) -> float:
        cost = self.modes[mode]
        kept_local = max(0.0, 1.0 - offload - recompute)
        return cost.anchor_bytes * (1.0 - anchor_offload) + cost.local_bytes * kept_local


@dataclass(frozen=True)
class StageExtra:
    """What the first (embedding) or last (final norm, output, loss) stage adds."""

    params: int
    saved_bytes: float
    forward_seconds: float
    backward_seconds: float
    weight_grad_seconds: float
    zero_exposed_seconds: float


def _shard_factor(zero_stage: int, needed: int, shard_ranks: int) -> float:
    return 1.0 / shard_ranks if zero_stage >= needed else 1.0


@functools.lru_cache(maxsize=8192)
def layout_costs(
    model: ModelConfig,
    cluster: ClusterConfig,
    train: TrainConfig,
    planner: PlannerConfig,
    layout: Layout,
    checkpointing: bool,
) -> LayoutCosts:
    """The cost coefficients of `layout` (see the module docstring for every formula)."""
    rates = Rates.of(cluster, planner)
    dtype = training_dtype(cluster, train)
    a = dtype_bytes(dtype)
    tp, sp, pp, dp = layout.tp, layout.sp, layout.pp, layout.dp
    mb = layout.micro_batch_size
    seq = train.seq_len
    seq_local = seq // sp
    tokens = mb * seq_local
    gpn = cluster.gpus_per_node
    hidden, vocab = model.hidden_size, model.vocab_size
    head_dim = model.resolved_head_dim
    ffn_r = model.ffn_size // tp
    q_r = model.num_heads // tp * head_dim
    kv_r = model.num_kv_heads // tp * head_dim
    shape = LayerShape.of(model, a, tp, sp)
    counts = param_counts(model, tp, pp)

    def matmul_s(flops: float) -> float:
        return flops / rates.matmul

    def memory_s(nbytes: float) -> float:
        return nbytes / rates.memory

    # --- communication links (mesh order pp, dp, sp, tp; tp innermost) ---
    tp_link = rates.link(tp <= gpn)
    sp_link = rates.link(tp * sp <= gpn)
    zero_link = rates.link(tp * sp * dp <= gpn)
    pp_link = rates.link(tp * sp * dp * pp <= gpn)
    hidden_bytes = tokens * hidden * a
    latency = planner.collective_latency_seconds
    tp_allreduce_s = 2 * (tp - 1) / tp * hidden_bytes / tp_link + latency if tp > 1 else 0.0
    kv_a2a = sp * shape.kv_heads_in_core * head_dim
    ulysses_s = (
        (sp - 1) / sp * tokens * a * (2 * q_r + 2 * kv_a2a) / sp_link + 4 * latency
        if sp > 1
        else 0.0
    )

    # --- one layer's compute ---
    mm_fwd = 2.0 * tokens * counts.layer_matmul
    attn_fwd = 2.0 * tokens * seq * q_r
    elem_fwd = tokens * a * (10 * hidden + 3 * ffn_r + 2 * q_r + 2 * kv_r)
    overhead = rates.layer_overhead_seconds
    fwd = (
        matmul_s(mm_fwd)
        + attn_fwd / rates.attention
        + memory_s(elem_fwd)
        + 2 * tp_allreduce_s
        + ulysses_s
        + overhead
    )
    bwd = (
        matmul_s(2 * mm_fwd)
        + 2.5 * attn_fwd / rates.attention
        + memory_s(2 * elem_fwd)
        + 2 * tp_allreduce_s
        + ulysses_s
        + overhead
    )
    weight_grad = matmul_s(mm_fwd)
    local_recompute = (
        matmul_s(2.0 * tokens * (q_r * hidden + 2 * hidden * ffn_r))
        + memory_s(tokens * a * (8 * hidden + 3 * ffn_r))
        + tp_allreduce_s
    )
    selective_extra = memory_s(tokens * a * (4 * hidden + 3 * ffn_r))
    anchor = mb * shape.anchor_bytes(seq_local)
    local_none = mb * shape.local_bytes(seq_local, selective=False)
    modes = {
        "none": ModeCost(anchor, local_none, bwd, local_recompute),
        "selective": ModeCost(
            anchor,
            mb * shape.local_bytes(seq_local, selective=True),
            bwd + selective_extra,
            local_recompute,
        ),
        "full": ModeCost(mb * shape.input_bytes(seq_local), 0.0, bwd + fwd, 0.0),
    }

    # --- model states and ZeRO traffic ---
    per = StateBytesPerParam.of(dtype)
    z, shard = layout.zero_stage, dp * sp
    state_per_param = (
        per.params * _shard_factor(z, 3, shard)
        + per.grads * _shard_factor(z, 2, shard)
        + per.optimizer * _shard_factor(z, 1, shard)
    )
    grads_per_param = per.grads * _shard_factor(z, 2, shard)
    staging_per_param = (
        per.params * _shard_factor(z, 3, shard) + per.optimizer * _shard_factor(z, 1, shard)
        if checkpointing
        else 0.0
    )
    opt_seconds_per_param = memory_s(ADAM_BYTES_PER_PARAM * _shard_factor(z, 1, shard))
    f = (shard - 1) / shard
    psi = counts.layer

    def zero_exposed(params: int, fwd_s: float, bwd_s: float) -> float:
        if z == 3:
            gather = f * params * a / zero_link + latency
            return max(0.0, gather - fwd_s) + max(0.0, 2 * gather - bwd_s)
        if z == 2:
            return max(0.0, f * params * a / zero_link + latency - bwd_s)
        return 0.0

    overlapped_per_param = {0: 2 * f * a, 1: f * a}.get(z, 0.0)
    exposed_end_per_param = f * a if z in (1, 2) else 0.0

    # --- outside the layers ---
    rope = outside_layers_bytes(model, mb, seq_local, a, first_stage=False, last_stage=False)
    first_saved = (
        outside_layers_bytes(model, mb, seq_local, a, first_stage=True, last_stage=False) - rope
    )
    last_saved = (
        outside_layers_bytes(model, mb, seq_local, a, first_stage=False, last_stage=True) - rope
    )
    embed_fwd = memory_s(hidden_bytes)
    embed_bwd = memory_s(2 * hidden_bytes)
    logits_mm = 2.0 * tokens * vocab * hidden
    last_fwd = memory_s(2 * hidden_bytes) + matmul_s(logits_mm)
    last_bwd = memory_s(4 * hidden_bytes) + matmul_s(3 * logits_mm)
    last_params = counts.final_norm + counts.output
    if model.tie_embeddings and pp == 1:
        last_params = counts.final_norm  # the embedding is the output projection
    first = StageExtra(
        params=counts.embedding,
        saved_bytes=first_saved,
        forward_seconds=embed_fwd,
        backward_seconds=embed_bwd,
        weight_grad_seconds=0.0,
        zero_exposed_seconds=zero_exposed(counts.embedding, embed_fwd, embed_bwd),
    )
    last = StageExtra(
        params=last_params,
        saved_bytes=last_saved,
        forward_seconds=last_fwd,
        backward_seconds=last_bwd,
        weight_grad_seconds=matmul_s(logits_mm),
        zero_exposed_seconds=zero_exposed(
            max(counts.output, counts.embedding if model.tie_embeddings else 0), last_fwd, last_bwd
        ),
    )

    # --- transient working set ---
    workspace = tokens * a * (WORKSPACE_FFN_TENSORS * ffn_r + WORKSPACE_HIDDEN_TENSORS * hidden)
    zero_layer = {3: 3 * psi * a, 2: psi * a}.get(z, 0)
    loss_chunk = min(train.loss_chunk_tokens, tokens)
    loss_transient = loss_chunk * vocab * (a + 2 * FP32_BYTES) + vocab * hidden * FP32_BYTES
    output_params = counts.output or counts.embedding
    budget, reserved = gpu_budget_bytes(cluster, planner)
    return LayoutCosts(
        layout=layout,
        dtype=dtype,
        seq_local=seq_local,
        tokens=tokens,
        modes=modes,
        forward_seconds=fwd,
        weight_grad_seconds=weight_grad,
        layer_comm_seconds=2 * (2 * tp_allreduce_s + ulysses_s),
        full_layer_bytes=anchor + local_none,
        layer_params=psi,
        state_bytes_per_param=state_per_param,
        grads_bytes_per_param=grads_per_param,
        grads_follow_backward=(
            layout.zero_backend == "fsdp2" and layout.pp == 1 and layout.num_microbatches == 1
        ),
        staging_bytes_per_param=staging_per_param,
        optimizer_seconds_per_param=opt_seconds_per_param,
        zero_overlapped_seconds_per_param=overlapped_per_param / zero_link,
        zero_exposed_end_seconds_per_param=exposed_end_per_param / zero_link,
        layer_zero_exposed_seconds=zero_exposed(psi, fwd, bwd),
        first=first,
        last=last,
        chunk_saved_bytes=rope,
        boundary_bytes=hidden_bytes,
        p2p_seconds=hidden_bytes / pp_link + latency if pp > 1 else 0.0,
        workspace_bytes=workspace,
        zero_layer_transient_bytes=zero_layer,
        loss_transient_bytes=loss_transient,
        zero_output_transient_bytes=output_params * a if z == 3 else 0,
        budget_bytes=budget,
        reserved_bytes=reserved,
        host_budget_bytes=host_budget_bytes(cluster, planner),
        offload=offload_enabled(cluster, planner),
        full_recompute=not (layout.zero_backend == "deepspeed" and z == 3),
        host_link=rates.host_link,
        gpus_per_node=gpn,
    )


def costs_for(cfg: Config, layout: Layout) -> LayoutCosts:
    """layout_costs from the root config (checkpoint staging counts when checkpointing)."""
    return layout_costs(
        cfg.model, cfg.cluster, cfg.train, cfg.planner, layout, cfg.checkpoint.every > 0
    )
