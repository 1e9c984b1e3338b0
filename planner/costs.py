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
Model states in host RAM (layout.state_offload "all", FSDP2 CPUOffloadPolicy at ZeRO-2/3):
    the device holds no states; the host 16 Psi / Nd per GPU (host_states); each all-gather
    first copies the unit's fp32 shard to the device (4 Psi / Nd over the host link, in series
    with the gather; the copy is working set), each reduce-scatter's fp32 gradient shard goes
    back; the optimizer step runs on the node's CPUs, which serve its GPUs one after another:
    Psi / Nd x gpus_per_node / cluster.host_adam_gparams_per_second, exposed.
DeepSpeed's offload_optimizer (layout.state_offload "optimizer", ZeRO-2/3): the device keeps
    the compute-dtype parameters (2 Psi; ZeRO-3 2 Psi / Nd), as DeepSpeed's estimators with
    cpu_offload=True count them; the host 16 Psi / Nd (fp32 master, its gradient, m, v) and
    a Psi / Nd more (ZeRO-2: the compute-dtype copy of the partition; ZeRO-3: the flat
    gradient buffer), plus ZeRO-2's one-gradient staging buffer, measured; the gradient
    partition goes to the host during backward, the updated partition comes back after the
    host step (exposed). ZeRO-2 offload runs one micro-batch per step (planner/layouts.py).
On CUDA every pinned host allocation is rounded up to a power of two, as torch's caching host
    allocator does by default (_host_state_coefficients says which tensors are pinned).

Transient working set on a rank (beyond the states and the in-flight saved activations),
each term checked against torch's MemTracker / FSDPMemTracker tracing the runtime at real
widths (framework/measure/trace.py; bench/estimator_accuracy.py --trace):
    a layer's backward    two instants (layer_workspace_bytes): the SwiGLU backward, net
                          T a (3F + H) over the saved set (+ w2's weight gradient), with the
                          layer's offloaded and recomputed tensors back on the device and the
                          next layer's prefetched (planner/memory.py back_on_device_bytes);
                          and its end, T H (3 x 4 + a) + all its weight gradients with only
                          its input left of its activations
    FSDP2 (ZeRO-2/3)      states 16 Psi / Nd as allocated (fp32 shards, fp32 gradient shards,
                          m, v); each stage's root (embedding, final norm, output) gathered
                          in the compute dtype through forward and backward (twice while its
                          all-gather buffer lives, at the start); ZeRO-3: the layer's own and
                          the next layer's gathered parameters, ZeRO-2: every layer gathered
                          from its forward to its backward; the previous unit's fp32
                          reduce-scatter input (the output's after the loss); a tied output's
                          unsharded gradient until the embedding's backward
    DeepSpeed ZeRO-2/3    states as DeepSpeed's estimators count them in bf16 (2 Psi +
                          18 Psi / Nd, 18 Psi / Nd: the fp32 gradient partition included;
                          tests/unit/test_deepspeed_estimators.py); ZeRO-2: one unsharded
                          layer gradient; ZeRO-3: the largest module's parameters and
                          gradients (the estimator's 4 x largest layer)
    torch ZeRO-1          the busiest owner's optimizer state (whole tensors, largest first)
    loss (last stage)     loss_transient_bytes: one fp32 min(loss_chunk_tokens, T) x vocab
                          block (+ its copy in the dtype when that is not fp32) + the fp32
                          [vocab, H] weight-gradient accumulator and the chunk's hidden states
                          in fp32 (bf16 only: in fp32 the accumulator is the gradient itself)
                          + the gradient of the hidden states
Pipeline stages also hold each in-flight micro-batch's stage input and output (T H a each:
torch.distributed.pipelining keeps them for the backward).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from configs.schema import ClusterConfig, Config, ModelConfig, PlannerConfig, TrainConfig
from planner.activations import FP32_BYTES, LayerShape, outside_layers_bytes
from planner.modes import full_recompute_runs
from planner.params import (
    ModelStateBytes,
    ParamCounts,
    StateBytesPerParam,
    deepspeed_offload_state_bytes,
    deepspeed_state_bytes,
    fsdp2_state_bytes,
    model_state_bytes,
    no_decay_params,
    owner_partition_max,
    param_counts,
    parameter_sizes,
    pinned_bytes,
    pinned_shard_bytes,
    shard_numel,
    total_params,
)
from planner.plan import Layout
from planner.units import GIB

ADAM_BYTES_PER_PARAM = 28
"""Optimizer step traffic per parameter of the optimizer shard: fp32 master (or fp32 params),
m and v read and written (24) + the gradient read and the parameter written."""
NORM_BACKWARD_FP32_TENSORS = 4
"""fp32 [T, H] temporaries alive at once in framework/components/ops.py's RMSNorm backward
at the layer's last instant (traced with torch's MemTracker / FSDPMemTracker at four widths,
bf16 and fp32: with NORM_BACKWARD_GRADIENTS, 3 [T, H] bf16 / 2 fp32 more than the three
that were counted before; it became the peak with activations fetched on demand)."""
NORM_BACKWARD_GRADIENTS = 2
"""Compute-dtype [T, H] gradients at that instant: the incoming one and the residual
stream's."""
FINAL_NORM_FP32_TENSORS = 4
"""fp32 [T, H] temporaries alive at once in the final norm's backward (measured with torch's
MemTracker: one more than in a layer's norms)."""
SWIGLU_BACKWARD_TENSORS = 3
"""[T, F] temporaries alive at once in framework/components/ops.py's SwiGLU backward."""
REDUCE_BYTES = FP32_BYTES
"""FSDP2 reduces gradients in fp32 (parallel/zero.py's MixedPrecisionPolicy)."""


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
    host_state_bytes_per_param: float
    """Model states kept in host memory per parameter (layout.state_offload), or 0."""
    host_state_constant_bytes: float
    """Host buffers of offloaded states that do not scale with a rank's parameters, per GPU."""
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
    mlp_workspace_bytes: float
    """The SwiGLU-backward instant of a layer's backward (layer_workspace_bytes)."""
    end_workspace_bytes: float
    norm2_workspace_bytes: float
    """The MLP norm's backward instant, after the MLP's: the norm's temporaries as at the
    layer's last instant, beside the MLP's weight gradients (FSDP2: unsharded)."""
    """The attention-norm-backward instant, the layer's last (layer_workspace_bytes)."""
    input_bytes: float
    """One layer's input [T, H]: what is left of its activations at its last instant."""
    swiglu_saved_bytes: float
    """The SwiGLU's saved tensors of one layer, its inputs a = w1 h2, b = w3 h2 and its
    product p ([T, F] each): what of a layer must be on the device at its SwiGLU-backward
    instant under any policy (kept, fetched back or recomputed)."""
    attention_output_bytes: float
    """o [T, heads / tp x head_dim]: the attention core's output, with the layer input x
    the post-attention region's inputs (anchors)."""
    arriving_norm2_grads_bytes: float
    """Outside FSDP2, the MLP's gradients (of the states) at the MLP norm's backward."""
    arriving_grads_bytes: tuple[float, float]
    """Outside FSDP2, the gradients (of the states) one layer's backward has produced at its
    SwiGLU-backward instant (w2's) and at its last instant (all), where a step's gradients
    follow its backward (FSDP2: in the workspace, unsharded)."""
    zero_layer_transient_bytes: float
    """Unsharded parameters and gradients of the layer whose backward runs (and the next
    layer's prefetch) beyond the workspace; FSDP2: see fsdp2_units."""
    loss_transient_bytes: float
    zero_output_transient_bytes: float
    output_is_embedding: bool
    """Tied embeddings on one stage: the loss's weight gradient is the embedding's."""
    owner_imbalance_bytes: float
    """torch's ZeRO-1: the busiest owner's optimizer bytes beyond an even share (exact on one
    stage, bounded by the largest tensor's elsewhere; 0 for other layouts)."""
    fsdp2_units: bool
    """FSDP2 units (zero_backend fsdp2, ZeRO-2/3): every decoder layer and each stage's root
    (its embedding, final norm, output) is a unit whose compute-dtype parameters are
    all-gathered for its forward and backward; the root's stay gathered from the first
    forward to the end of the backward (FSDP2 does not reshard the root after forward), and
    ZeRO-2's layers stay gathered from their forward to their backward."""
    gathered_layer_bytes: float
    """FSDP2: one layer's all-gathered compute-dtype parameters (0 otherwise)."""
    reduce_scatter_layer_bytes: float
    """FSDP2: one layer's gradients in the reduce dtype (fp32), the reduce-scatter input,
    alive until the next unit's reduce-scatter (0 otherwise)."""
    reduce_scatter_output_bytes: float
    """FSDP2: the last stage root's output + final norm gradients in fp32, reduce-scattered
    after the loss's backward and alive during the last layer's backward (0 otherwise)."""
    held_output_grad_bytes: float
    """FSDP2 with tied embeddings on one stage: the output projection is the embedding, so
    its unsharded gradient waits, in the compute dtype, for the embedding's backward (0
    otherwise)."""
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
    def on_demand(self) -> bool:
        """layout.activation_fetch = "on_demand": offloaded activations come back tensor by
        tensor when autograd unpacks them, nothing fetched ahead (offload/engine.py)."""
        return self.layout.activation_fetch == "on_demand"

    @property
    def states_per_param(self) -> StateBytesPerParam:
        return StateBytesPerParam.of(self.dtype)

    @property
    def host_resident_bytes_per_param(self) -> float:
        """Host bytes per parameter whatever the activation policy: offloaded model states
        and checkpoint staging."""
        return self.host_state_bytes_per_param + self.staging_bytes_per_param

    def model_states(self, num_params: int, sizes: list[int] | None = None) -> ModelStateBytes:
        """Model states of `num_params` parameters held by one GPU of this layout, as its
        backend allocates them (backend_states); `sizes`: those parameters tensor by tensor,
        for torch's ZeRO-1, which gives each tensor whole to one owner."""
        states = backend_states(self.layout, self.dtype, num_params)
        shard = self.layout.dp * self.layout.sp
        if owner_partitioned(self.layout) and sizes is not None and shard > 1:
            busiest = owner_partition_max(sizes, shard)
            return dataclasses.replace(states, optimizer=self.states_per_param.optimizer * busiest)
        return states

    @property
    def gather_copy_factor(self) -> float:
        """What gathering a unit briefly adds, per byte of its gathered parameters: FSDP2's
        all-gather buffer beside the gathered copy (1), or on one rank the fp32 copy it casts
        from, before the gathered copy exists (4 / dtype bytes - 1); 0 without FSDP2
        (measured with FSDPMemTracker at the root's gather)."""
        if not self.fsdp2_units:
            return 0.0
        return 1.0 if self.all_gathers else FP32_BYTES / dtype_bytes(self.dtype) - 1.0

    @property
    def final_norm_backward_bytes(self) -> float:
        """Working set of the final norm's backward beyond the saved set (less the loss's
        hidden input, freed) and the output's gradients: FINAL_NORM_FP32_TENSORS fp32 [T, H]
        temporaries and the incoming gradient, the output's reduce-scatter input or a tied
        output's held gradient (FSDP2) and the first layer in backward being all-gathered."""
        fp32_share = FINAL_NORM_FP32_TENSORS * FP32_BYTES / dtype_bytes(self.dtype)
        norm = self.boundary_bytes * (fp32_share + 1)
        return (
            norm
            + self.reduce_scatter_output_bytes
            + self.held_output_grad_bytes
            + (self.prefetched_layer_bytes)
        )

    @property
    def prefetched_layer_bytes(self) -> float:
        """ZeRO-3 under FSDP2 over more than one rank: the next layer's all-gathered
        parameters, part of zero_layer_transient_bytes (0 otherwise)."""
        zero3 = self.layout.zero_stage == 3
        return self.gathered_layer_bytes if zero3 and self.all_gathers else 0.0

    @property
    def all_gathers(self) -> bool:
        """FSDP2 over more than one rank: every gather goes through an all-gather buffer
        (on one rank FSDP2 copies the shard straight into the unsharded parameters)."""
        return self.fsdp2_units and self.layout.dp * self.layout.sp > 1

    def gathered_root_bytes(self, stages: list[int], num_stages: int) -> float:
        """FSDP2: the roots of `stages` (a rank's stages), gathered through forward and
        backward in the compute dtype (0 otherwise)."""
        if not self.fsdp2_units:
            return 0.0
        params = sum(self.stage_extra_params(c, num_stages) for c in stages)
        return params * dtype_bytes(self.dtype)

    def _previous_unit_bytes(self, first_in_backward: bool) -> float:
        previous = (
            self.reduce_scatter_output_bytes
            if first_in_backward
            else self.reduce_scatter_layer_bytes
        )
        return self.zero_layer_transient_bytes + previous + self.held_output_grad_bytes

    def layer_backward_bytes(self, first_in_backward: bool) -> float:
        """Working set at the SwiGLU-backward instant of one layer's backward, beyond the
        states, the saved activations (the product it frees already left out) and the
        gradients of the layers before it: the workspace, the gathered parameters (ZeRO-3:
        its own and the next layer's prefetch), the previous unit's reduce-scatter input
        (FSDP2; first_in_backward: the last stage's last layer follows the output's) and
        a tied output's held gradient. Recomputed / prefetched activations are added by
        the callers (they depend on the plan)."""
        return self.mlp_workspace_bytes + self._previous_unit_bytes(first_in_backward)

    def layer_norm2_bytes(self, first_in_backward: bool) -> float:
        """Working set at the MLP norm's backward instant (after the MLP's backward), beyond
        the states, the activations still saved and the gradients of the layers before it.
        Under tensor parallelism the MLP's tensors shrink with tp but the norms' [T, H]
        temporaries do not, so this instant can hold the layer's peak (traced at tp4)."""
        return self.norm2_workspace_bytes + self._previous_unit_bytes(first_in_backward)

    def mlp_saved_bytes(self, mode: str) -> float:
        """The MLP's saved tensors of one layer in `mode` that stay saved (kept, offloaded or
        recomputed token-wise): h2, a, b, p; under selective recomputation a and b (h2 and p
        are recipes). Full recomputation keeps none of them."""
        if mode == "full":
            return 0.0
        if mode == "selective":
            return self.swiglu_saved_bytes * 2 / 3
        return self.swiglu_saved_bytes + self.boundary_bytes

    def mlp_present_bytes(self, mode: str) -> float:
        """Of one layer's MLP tensors, those on the device at its SwiGLU-backward instant
        (kept, fetched ahead or recomputed), all freed by its MLP norm's backward: h2, a, b,
        p (selective: a, b and the regenerated p; h2 follows later)."""
        if mode == "selective":
            return self.swiglu_saved_bytes
        return self.swiglu_saved_bytes + self.boundary_bytes

    def layer_end_bytes(self, first_in_backward: bool) -> float:
        """Working set at the last instant of one layer's backward, when all its weight
        gradients exist and of its activations only its input is left (counted here)."""
        return (
            self.end_workspace_bytes
            + self.input_bytes
            + self._previous_unit_bytes(first_in_backward)
        )

    @property
    def layer_backward_bound_bytes(self) -> float:
        """Bound on either instant of any layer's backward with all of its activations (the
        in-flight rows: one layer of activations is what layer_end_bytes replaces)."""
        return max(
            self.layer_backward_bytes(True),
            self.layer_backward_bytes(False),
            self.end_workspace_bytes + self._previous_unit_bytes(True),
            self.end_workspace_bytes + self._previous_unit_bytes(False),
        )

    def stage_extra_params(self, stage: int, num_stages: int) -> int:
        """Parameters global stage `stage` holds beyond its layers (first/last-stage extras)."""
        first = self.first.params if stage == 0 else 0
        return first + (self.last.params if stage == num_stages - 1 else 0)

    def stage_constant_bytes(self, stage: int, num_stages: int) -> float:
        """Saved bytes of global stage `stage` per micro-batch beyond its layers: the RoPE
        tables, the pipeline stage input and output, the first/last-stage extras."""
        last = num_stages - 1
        boundary = (stage > 0) + (stage < last) if self.layout.pp > 1 else 0
        saved = self.chunk_saved_bytes + boundary * self.boundary_bytes
        saved += self.first.saved_bytes if stage == 0 else 0
        saved += self.last.saved_bytes if stage == last else 0
        return saved

    def present_bytes(self, mode: str) -> float:
        """One mode-`mode` layer's activations on the device at its SwiGLU-backward instant
        when all its offloaded and recomputed tensors are back (planner/memory.py's
        back_on_device_bytes): none keeps everything; selective has regenerated only the
        SwiGLU product; full has run its whole forward again."""
        if mode == "selective":  # all of it but h1 and h2, [T, H] each
            return self.full_layer_bytes - 2 * self.boundary_bytes
        return self.full_layer_bytes

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


@dataclass(frozen=True)
class _Rank:
    """One rank's share of one micro-batch: the module docstring's symbols, and its rates."""

    rates: Rates
    a: int
    """Dtype bytes."""
    micro_batch: int
    seq: int
    """s: the whole sequence (causal attention spans it)."""
    seq_local: int
    tokens: int
    """T = micro_batch x seq_len / sp."""
    hidden: int
    """H."""
    vocab: int
    head_dim: int
    ffn: int
    """F = ffn / tp."""
    q: int
    """heads / tp x head_dim."""
    kv: int
    """kv_heads / tp x head_dim."""
    shape: LayerShape
    counts: ParamCounts

    @staticmethod
    def of(model: ModelConfig, rates: Rates, a: int, layout: Layout, seq: int) -> _Rank:
        tp, sp = layout.tp, layout.sp
        seq_local = seq // sp
        head_dim = model.resolved_head_dim
        return _Rank(
            rates=rates,
            a=a,
            micro_batch=layout.micro_batch_size,
            seq=seq,
            seq_local=seq_local,
            tokens=layout.micro_batch_size * seq_local,
            hidden=model.hidden_size,
            vocab=model.vocab_size,
            head_dim=head_dim,
            ffn=model.ffn_size // tp,
            q=model.num_heads // tp * head_dim,
            kv=model.num_kv_heads // tp * head_dim,
            shape=LayerShape.of(model, a, tp, sp),
            counts=param_counts(model, tp, layout.pp),
        )

    @property
    def hidden_bytes(self) -> int:
        """One [T, H] tensor."""
        return self.tokens * self.hidden * self.a

    def matmul_s(self, flops: float) -> float:
        return flops / self.rates.matmul

    def memory_s(self, nbytes: float) -> float:
        return nbytes / self.rates.memory


@dataclass(frozen=True)
class _Links:
    """Communication of one layout (mesh order pp, dp, sp, tp; tp innermost)."""

    tp_allreduce_seconds: float
    """One all-reduce of T H a over the tp group (0 without tp)."""
    ulysses_seconds: float
    """The Ulysses all-to-alls of one direction (0 without sp)."""
    zero: float
    """Bytes/s of the dp x sp group ZeRO shards over."""
    pp: float
    """Bytes/s between pipeline neighbours."""
    latency: float
    """planner.collective_latency_seconds, per collective or p2p transfer."""

    @staticmethod
    def of(rank: _Rank, layout: Layout, rates: Rates, latency: float, gpn: int) -> _Links:
        tp, sp, pp, dp = layout.tp, layout.sp, layout.pp, layout.dp
        tp_link = rates.link(tp <= gpn)
        sp_link = rates.link(tp * sp <= gpn)
        tp_allreduce_s = (
            2 * (tp - 1) / tp * rank.hidden_bytes / tp_link + latency if tp > 1 else 0.0
        )
        kv_a2a = sp * rank.shape.kv_heads_in_core * rank.head_dim
        ulysses_s = (
            (sp - 1) / sp * rank.tokens * rank.a * (2 * rank.q + 2 * kv_a2a) / sp_link + 4 * latency
            if sp > 1
            else 0.0
        )
        return _Links(
            tp_allreduce_seconds=tp_allreduce_s,
            ulysses_seconds=ulysses_s,
            zero=rates.link(tp * sp * dp <= gpn),
            pp=rates.link(tp * sp * dp * pp <= gpn),
            latency=latency,
        )


@dataclass(frozen=True)
class _Layer:
    """One decoder layer's compute: forward, backward without recompute, weight-grad pass,
    and its cost in each recompute mode."""

    forward_seconds: float
    backward_seconds: float
    weight_grad_seconds: float
    modes: dict[str, ModeCost]


def _layer(rank: _Rank, links: _Links) -> _Layer:
    """The per-layer compute formulas of the module docstring."""
    tokens, a, hidden, ffn, q = rank.tokens, rank.a, rank.hidden, rank.ffn, rank.q
    mm_fwd = 2.0 * tokens * rank.counts.layer_matmul
    attn_fwd = 2.0 * tokens * rank.seq * q
    elem_fwd = tokens * a * (10 * hidden + 3 * ffn + 2 * q + 2 * rank.kv)
    tp_allreduce_s, ulysses_s = links.tp_allreduce_seconds, links.ulysses_seconds
    overhead = rank.rates.layer_overhead_seconds
    fwd = (
        rank.matmul_s(mm_fwd)
        + attn_fwd / rank.rates.attention
        + rank.memory_s(elem_fwd)
        + 2 * tp_allreduce_s
        + ulysses_s
        + overhead
    )
    bwd = (
        rank.matmul_s(2 * mm_fwd)
        + 2.5 * attn_fwd / rank.rates.attention
        + rank.memory_s(2 * elem_fwd)
        + 2 * tp_allreduce_s
        + ulysses_s
        + overhead
    )
    local_recompute = (
        rank.matmul_s(2.0 * tokens * (q * hidden + 2 * hidden * ffn))
        + rank.memory_s(tokens * a * (8 * hidden + 3 * ffn))
        + tp_allreduce_s
    )
    selective_extra = rank.memory_s(tokens * a * (4 * hidden + 3 * ffn))
    mb, shape, seq_local = rank.micro_batch, rank.shape, rank.seq_local
    anchor = mb * shape.anchor_bytes(seq_local)
    modes = {
        "none": ModeCost(
            anchor, mb * shape.local_bytes(seq_local, selective=False), bwd, local_recompute
        ),
        "selective": ModeCost(
            anchor,
            mb * shape.local_bytes(seq_local, selective=True),
            bwd + selective_extra,
            local_recompute,
        ),
        "full": ModeCost(mb * shape.input_bytes(seq_local), 0.0, bwd + fwd, 0.0),
    }
    return _Layer(fwd, bwd, rank.matmul_s(mm_fwd), modes)


@dataclass(frozen=True)
class _Zero:
    """ZeRO over the dp x sp ranks: which states it shards and the traffic it adds."""

    stage: int
    shard_ranks: int
    a: int
    link: float
    latency: float
    host_link: float = 0.0
    """With model states offloaded, the host link every shard crosses (0: not offloaded):
    FSDP2 (state_offload all) copies the fp32 shard host-to-device before each all-gather
    and the fp32 gradient shard back after each reduce-scatter, in the same streams (so in
    series with them); DeepSpeed (state_offload optimizer) copies its gradient partition to
    the host during backward and the updated partition back after the host step."""
    host_copy_bytes: int = FP32_BYTES
    """Bytes per parameter of one shard copy (fp32 for FSDP2, the compute dtype for
    DeepSpeed)."""
    params_on_host: bool = False
    """FSDP2: the parameter shards live on the host, so every all-gather copies one in."""
    accumulating_share: float = 0.0
    """FSDP2 with offloaded states and G micro-batches on one pipeline stage: the (G-1)/G of
    backwards that add into a host gradient shard, where FSDP2 copies it device-to-host
    blocking (to_accumulate_grad), so the reduce-scatter and copy are exposed."""

    def host_copy(self, params: int) -> float:
        """Seconds of one shard copy of `params` parameters over the host link."""
        if not self.host_link:
            return 0.0
        return self.host_copy_bytes * params / self.shard_ranks / self.host_link

    @property
    def fraction(self) -> float:
        """f = (N-1)/N of the module docstring."""
        return (self.shard_ranks - 1) / self.shard_ranks

    def shard(self, needed: int) -> float:
        """The share of a state one rank holds: 1/N from ZeRO stage `needed` on."""
        return _shard_factor(self.stage, needed, self.shard_ranks)

    def exposed(self, params: int, fwd_s: float, bwd_s: float) -> float:
        """ZeRO-2/3 communication of `params` not hidden behind fwd_s / bwd_s of compute."""
        f = self.fraction
        copy = self.host_copy(params)  # the gradient's, in backward
        copy_in = copy if self.params_on_host else 0.0  # the parameters', per all-gather
        reduce = f * params * self.a / self.link + self.latency
        blocking = self.accumulating_share * (reduce + copy)
        if self.stage == 3:
            gather = reduce
            return (
                max(0.0, gather + copy_in - fwd_s)
                + max(0.0, 2 * gather + copy_in + copy - bwd_s)
                + blocking
            )
        if self.stage == 2:
            return max(0.0, reduce + copy - bwd_s) + blocking
        return 0.0

    def overlapped_per_param(self) -> float:
        """End-of-step gradient bytes per parameter that overlap the last backward (ZeRO-0/1)."""
        f = self.fraction
        return {0: 2 * f * self.a, 1: f * self.a}.get(self.stage, 0.0)

    def exposed_end_per_param(self) -> float:
        """Parameter all-gather bytes per parameter after the optimizer step (ZeRO-1/2)."""
        return self.fraction * self.a if self.stage in (1, 2) else 0.0

    def exposed_end_host_seconds_per_param(self) -> float:
        """Offloaded states: the updated shards' host-to-device copy after the host step
        (DeepSpeed; FSDP2 ZeRO-2, before its next all-gather), exposed like that all-gather
        (FSDP2 ZeRO-3 copies its shards in per all-gather instead: exposed())."""
        if self.params_on_host and self.stage == 3:
            return 0.0
        return self.host_copy(1)


def _stage_extras(
    model: ModelConfig, rank: _Rank, zero: _Zero, pp: int, rope: float
) -> tuple[StageExtra, StageExtra]:
    """(first, last): what the embedding stage and the final norm / output / loss stage add
    (saved bytes beyond the RoPE tables `rope` every stage holds)."""
    counts, a, seq_local, mb = rank.counts, rank.a, rank.seq_local, rank.micro_batch
    first_saved = (
        outside_layers_bytes(model, mb, seq_local, a, first_stage=True, last_stage=False) - rope
    )
    last_saved = (
        outside_layers_bytes(model, mb, seq_local, a, first_stage=False, last_stage=True) - rope
    )
    hidden_bytes = rank.hidden_bytes
    embed_fwd = rank.memory_s(hidden_bytes)
    embed_bwd = rank.memory_s(2 * hidden_bytes)
    logits_mm = 2.0 * rank.tokens * rank.vocab * rank.hidden
    last_fwd = rank.memory_s(2 * hidden_bytes) + rank.matmul_s(logits_mm)
    last_bwd = rank.memory_s(4 * hidden_bytes) + rank.matmul_s(3 * logits_mm)
    last_params = counts.final_norm + counts.output
    if model.tie_embeddings and pp == 1:
        last_params = counts.final_norm  # the embedding is the output projection
    first = StageExtra(
        params=counts.embedding,
        saved_bytes=first_saved,
        forward_seconds=embed_fwd,
        backward_seconds=embed_bwd,
        weight_grad_seconds=0.0,
        zero_exposed_seconds=zero.exposed(counts.embedding, embed_fwd, embed_bwd),
    )
    output_params = max(counts.output, counts.embedding if model.tie_embeddings else 0)
    last = StageExtra(
        params=last_params,
        saved_bytes=last_saved,
        forward_seconds=last_fwd,
        backward_seconds=last_bwd,
        weight_grad_seconds=rank.matmul_s(logits_mm),
        zero_exposed_seconds=zero.exposed(output_params, last_fwd, last_bwd),
    )
    return first, last


def layer_workspace_bytes(
    tokens: int, hidden: int, ffn: int, a: int, own_grads: tuple[float, float]
) -> tuple[float, float]:
    """(SwiGLU-backward instant, last instant) of one decoder layer's backward: its working
    set over the saved activations, measured with torch's MemTracker at real widths
    (tests/unit/test_measure_trace.py, framework/measure/trace.py's per-operator log).

    - SwiGLU backward (framework/components/ops.py): the incoming [T, H] gradient, the
      [T, F] gradient of the product and SWIGLU_BACKWARD_TENSORS more [T, F] temporaries,
      while the product (saved by w2) is already freed: net 3 [T, F] + 1 [T, H], beside
      w2's weight gradient (own_grads[0]).
    - The attention norm's backward, the layer's last op: NORM_BACKWARD_FP32_TENSORS fp32
      [T, H] temporaries and NORM_BACKWARD_GRADIENTS gradients, beside every weight gradient of the
      layer (own_grads[1]); the layer's activations are freed by then except its input
      (LayoutCosts.layer_end_bytes adds it).
    own_grads: the bytes of those gradients where the runtime holds them apart from the
    gradients counted as states (FSDP2's unsharded gradient, torch's param.grad)."""
    swiglu = tokens * a * (SWIGLU_BACKWARD_TENSORS * ffn + hidden) + own_grads[0]
    norm = tokens * hidden * (NORM_BACKWARD_FP32_TENSORS * FP32_BYTES + NORM_BACKWARD_GRADIENTS * a)
    norm += own_grads[1]
    return swiglu, norm


@functools.lru_cache(maxsize=8192)
def loss_transient_bytes(chunk_tokens: int, vocab: int, hidden: int, dtype_bytes: int) -> int:
    """Working set of framework/components/loss.py's backward beyond its inputs and the
    gradients it returns: one fp32 [chunk x vocab] block built in place, its copy in the
    training dtype when that is not fp32, and (bf16) the fp32 weight-gradient accumulator.
    Measured with torch's MemTracker in tests/unit/test_loss.py."""
    fp32 = dtype_bytes == FP32_BYTES
    block = chunk_tokens * vocab * (FP32_BYTES + (0 if fp32 else dtype_bytes))
    # bf16: the fp32 accumulator and the chunk's hidden states in fp32 for its update
    return block + (0 if fp32 else (vocab + chunk_tokens) * hidden * FP32_BYTES)


def fsdp2_sharded(layout: Layout) -> bool:
    """FSDP2 units: zero_backend fsdp2 at ZeRO-2/3 (LayoutCosts.fsdp2_units)."""
    return layout.zero_backend == "fsdp2" and layout.zero_stage >= 2


def deepspeed_estimated(layout: Layout, dtype: str) -> bool:
    """DeepSpeed ZeRO-2/3 in bf16: model states as DeepSpeed's estimators count them."""
    return layout.zero_backend == "deepspeed" and layout.zero_stage >= 2 and dtype == "bf16"


def owner_partitioned(layout: Layout) -> bool:
    """torch's ZeRO-1 (parallel/zero.py): optimizer state partitioned by whole tensors."""
    return layout.zero_backend == "fsdp2" and layout.zero_stage == 1


def backend_states(layout: Layout, dtype: str, num_params: int) -> ModelStateBytes:
    """Model states of `num_params` parameters on one GPU as the layout's backend allocates
    them (planner/params.py): FSDP2 (ZeRO-2/3), DeepSpeed ZeRO-2/3 in bf16 as its estimators
    count them, otherwise the ZeRO paper's table (torch's ZeRO-0/1, DeepSpeed in fp32 or at
    ZeRO-0/1); torch's ZeRO-1 owner partition is LayoutCosts.model_states's."""
    shard = layout.dp * layout.sp
    if layout.state_offload == "all":
        return ModelStateBytes(params=0, grads=0, optimizer=0)  # all in host memory
    if layout.state_offload == "optimizer":
        return deepspeed_offload_state_bytes(
            num_params, shard, layout.zero_stage, dtype_bytes(dtype)
        )
    if fsdp2_sharded(layout):
        return fsdp2_state_bytes(num_params, shard)
    if deepspeed_estimated(layout, dtype):
        return deepspeed_state_bytes(num_params, shard, layout.zero_stage)
    return model_state_bytes(num_params, shard, layout.zero_stage, dtype)


def host_states(layout: Layout, num_params: int, dtype_bytes: int) -> ModelStateBytes:
    """Model states of `num_params` parameters in one GPU's host memory (measured:
    tests/distributed/test_state_offload.py): FSDP2's sharded fp32 parameters, gradients and
    Adam moments under CPUOffloadPolicy (state_offload all), 16 bytes per parameter of the
    shard; DeepSpeed's fp32 master partition, its fp32 gradient and Adam's moments under
    offload_optimizer (state_offload optimizer), 16 too, and beside them at ZeRO-2 a
    compute-dtype copy of the partition (the one it copies to the device), at ZeRO-3 its
    flat gradient buffer in the compute dtype; nothing otherwise."""
    shard = layout.dp * layout.sp
    if layout.state_offload == "none":
        return ModelStateBytes(params=0, grads=0, optimizer=0)
    states = fsdp2_state_bytes(num_params, shard)
    if layout.state_offload == "optimizer":
        extra = dtype_bytes * shard_numel(num_params, shard)
        if layout.zero_stage == 2:
            return dataclasses.replace(states, params=states.params + extra)
        return dataclasses.replace(states, grads=states.grads + extra)
    return states


DEEPSPEED_SUB_GROUP_ELEMENTS = 10**9
"""DeepSpeed ZeRO-3's sub_group_size (its default): partitions are stepped, and their host
gradients pinned, in sub-groups of at most this many elements."""


def _rounding_excess(num_bytes: list[int]) -> int:
    """What pinning allocations of these sizes adds (pinned_bytes) beyond the sizes."""
    return sum(pinned_bytes(b) - b for b in num_bytes)


def _host_state_coefficients(
    model: ModelConfig,
    layout: Layout,
    host: ModelStateBytes,
    shard: int,
    pinned: bool,
    dtype: str,
) -> tuple[float, float, float]:
    """(host bytes per parameter, host bytes per GPU besides, pinned rounding factor of a
    layer's shards) of the offloaded states. FSDP2 pins each parameter and gradient shard
    (its moments are not pinned): a layer's shards rounded up to powers of two, per
    parameter, and the root tensors' own rounding beyond that factor as the constant.
    DeepSpeed (deepspeed/runtime/zero/stage_1_and_2.py, stage3.py) pins, per flat group
    (decayed, not): at ZeRO-2 the fp32 partition, its gradient and its compute-dtype copy,
    and a one-gradient staging buffer; at ZeRO-3 the fp32 gradients of each sub-group and one
    flat gradient buffer (its fp32 partitions are not pinned). With pipeline stages the root
    tensors' share is only ever added, never subtracted: not every rank holds them."""
    per_param = host.total / shard
    layer = parameter_sizes(model, layout.tp, 1, False, False)
    exact = FP32_BYTES * sum(shard_numel(n, shard) for n in layer)
    rounding = pinned_shard_bytes(layer, shard, FP32_BYTES) / exact if pinned else 1.0
    constant = 0.0
    if layout.state_offload == "all" and pinned:  # parameters and gradients pinned
        per_param += 2 * FP32_BYTES / shard * (rounding - 1.0)
        root = parameter_sizes(model, layout.tp, 0, True, True)
        root_exact = FP32_BYTES * sum(shard_numel(n, shard) for n in root)
        constant = 2 * (pinned_shard_bytes(root, shard, FP32_BYTES) - rounding * root_exact)
        if layout.pp > 1:
            constant = max(0.0, constant)
    if layout.state_offload == "optimizer":
        a = dtype_bytes(dtype)
        groups = [total_params(model) - no_decay_params(model), no_decay_params(model)]
        parts = [shard_numel(n, shard) for n in groups]
        if layout.zero_stage == 2:  # the staging buffer of one gradient (compute dtype)
            staging = a * max(parameter_sizes(model, 1, model.num_layers, True, True))
            constant = staging
            if pinned:
                constant += _rounding_excess([staging])
                for size in (FP32_BYTES, FP32_BYTES, a):  # partition, its gradient, its copy
                    constant += _rounding_excess([size * n for n in parts])
        elif pinned:
            sub_groups = [
                min(DEEPSPEED_SUB_GROUP_ELEMENTS, n - start)
                for n in parts
                for start in range(0, n, DEEPSPEED_SUB_GROUP_ELEMENTS)
            ]
            constant += _rounding_excess([FP32_BYTES * n for n in sub_groups])
            constant += _rounding_excess([a * sum(parts)])  # the flat gradient buffer
    return per_param, constant, rounding


def _deepspeed_layer_transient(stage: int, psi: int, a: int, counts: ParamCounts) -> float:
    """DeepSpeed's working set during a layer's backward: ZeRO-3 gathers parameters and
    gradients of its largest module (its estimator's 4 x largest-layer term in bf16: the
    embedding or output projection where they are larger than a layer; DeepSpeed cannot be
    traced under fake tensors, so its estimator is the reference); ZeRO-2 one unsharded
    layer gradient."""
    if stage == 3:
        return 2 * a * max(psi, counts.embedding, counts.output)
    return psi * a if stage == 2 else 0.0


def _owner_imbalance_bytes(model: ModelConfig, layout: Layout, optimizer_bytes: int) -> float:
    """What torch's ZeRO-1 owner partition adds to the busiest owner over an even share of
    the optimizer state: exact on one stage; otherwise LPT's bound, the largest tensor x
    (N - 1) / N (planner/params.py owner_partition_max)."""
    ranks = layout.dp * layout.sp
    if not owner_partitioned(layout) or ranks == 1:
        return 0.0
    if layout.pp == 1:
        sizes = parameter_sizes(model, layout.tp, model.num_layers, True, True)
        return optimizer_bytes * (owner_partition_max(sizes, ranks) - sum(sizes) / ranks)
    sizes = parameter_sizes(model, layout.tp, 1, True, True)
    return optimizer_bytes * max(sizes) * (ranks - 1) / ranks


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
    gpn = cluster.gpus_per_node
    rank = _Rank.of(model, rates, a, layout, train.seq_len)
    links = _Links.of(rank, layout, rates, planner.collective_latency_seconds, gpn)
    layer = _layer(rank, links)
    offloaded = layout.state_offload != "none"
    zero = _Zero(
        layout.zero_stage,
        layout.dp * layout.sp,
        a,
        links.zero,
        links.latency,
        host_link=rates.host_link if offloaded else 0.0,
        host_copy_bytes=FP32_BYTES if layout.state_offload == "all" else a,
        params_on_host=layout.state_offload == "all",
        accumulating_share=(
            (layout.num_microbatches - 1) / layout.num_microbatches
            if layout.state_offload == "all" and layout.pp == 1
            else 0.0
        ),
    )
    rope = outside_layers_bytes(
        model, rank.micro_batch, rank.seq_local, a, first_stage=False, last_stage=False
    )
    first, last = _stage_extras(model, rank, zero, layout.pp, rope)
    # model states per parameter after ZeRO sharding (FSDP2: as it allocates them)
    fsdp2 = fsdp2_sharded(layout)
    # one parameter per shard: the backend's exact bytes per parameter after sharding
    unit = backend_states(layout, dtype, zero.shard_ranks)
    host = host_states(layout, zero.shard_ranks, a)
    sharded_params = unit.params / zero.shard_ranks
    sharded_optimizer = unit.optimizer / zero.shard_ranks
    grads_per_param = unit.grads / zero.shard_ranks
    # transient working set (module docstring)
    psi, hidden, ffn = rank.counts.layer, rank.hidden, rank.ffn
    # the layer's own gradients at its two backward instants (w2's, then all of them): FSDP2
    # holds them unsharded in the compute dtype; DeepSpeed and torch's replicated runtimes
    # in their gradient buffers, sharded by DeepSpeed from ZeRO-2 on (grads_per_param)
    arriving = (grads_per_param * hidden * ffn, grads_per_param * psi)
    own_grads = (a * hidden * ffn, a * psi) if fsdp2 else (0.0, 0.0)
    mlp_workspace, end_workspace = layer_workspace_bytes(rank.tokens, hidden, ffn, a, own_grads)
    mlp_grads = 3 * hidden * ffn  # w1, w2, w3
    norm2_workspace = end_workspace - own_grads[1] + (a * mlp_grads if fsdp2 else 0.0)
    tied_root = fsdp2 and model.tie_embeddings and layout.pp == 1
    pinned = cluster.device == "cuda"  # host buffers beside a GPU are pinned
    host_per_param, host_constant, rounding = _host_state_coefficients(
        model, layout, host, zero.shard_ranks, pinned, dtype
    )
    loss_chunk = min(train.loss_chunk_tokens, rank.tokens)
    # + the gradient of the hidden states it returns (the saved hidden states are activations)
    loss_transient = loss_transient_bytes(loss_chunk, rank.vocab, hidden, a) + rank.hidden_bytes
    output_params = rank.counts.output or rank.counts.embedding
    budget, reserved = gpu_budget_bytes(cluster, planner)
    none = layer.modes["none"]
    return LayoutCosts(
        layout=layout,
        dtype=dtype,
        seq_local=rank.seq_local,
        tokens=rank.tokens,
        modes=layer.modes,
        forward_seconds=layer.forward_seconds,
        weight_grad_seconds=layer.weight_grad_seconds,
        layer_comm_seconds=2 * (2 * links.tp_allreduce_seconds + links.ulysses_seconds),
        full_layer_bytes=none.anchor_bytes + none.local_bytes,
        layer_params=psi,
        state_bytes_per_param=sharded_params + grads_per_param + sharded_optimizer,
        grads_bytes_per_param=grads_per_param,
        grads_follow_backward=(
            layout.zero_backend == "fsdp2" and layout.pp == 1 and layout.num_microbatches == 1
        ),
        # the snapshot copies the fp32 parameters and optimizer state wherever they live,
        # into buffers pinned per tensor on CUDA
        staging_bytes_per_param=(
            ((host.params + host.optimizer) / zero.shard_ranks + sharded_params + sharded_optimizer)
            * (rounding if pinned else 1.0)
            if checkpointing
            else 0.0
        ),
        host_state_bytes_per_param=host_per_param,
        host_state_constant_bytes=host_constant,
        optimizer_seconds_per_param=(
            # the node's CPUs run the step of its GPUs' shards (cluster.host_adam_*)
            zero.shard(1) * gpn / (cluster.host_adam_gparams_per_second * 1e9)
            if offloaded
            else rank.memory_s(ADAM_BYTES_PER_PARAM * zero.shard(1))
        ),
        zero_overlapped_seconds_per_param=zero.overlapped_per_param() / zero.link,
        zero_exposed_end_seconds_per_param=(
            zero.exposed_end_per_param() / zero.link + zero.exposed_end_host_seconds_per_param()
        ),
        layer_zero_exposed_seconds=zero.exposed(psi, layer.forward_seconds, layer.backward_seconds),
        first=first,
        last=last,
        chunk_saved_bytes=rope,
        boundary_bytes=rank.hidden_bytes,
        p2p_seconds=rank.hidden_bytes / links.pp + links.latency if layout.pp > 1 else 0.0,
        mlp_workspace_bytes=mlp_workspace,
        end_workspace_bytes=end_workspace,
        norm2_workspace_bytes=norm2_workspace,
        arriving_norm2_grads_bytes=0.0 if fsdp2 else grads_per_param * mlp_grads,
        input_bytes=rank.hidden_bytes,
        swiglu_saved_bytes=3 * rank.tokens * ffn * a,
        attention_output_bytes=rank.tokens * rank.q * a,
        arriving_grads_bytes=(0.0, 0.0) if fsdp2 else arriving,
        zero_layer_transient_bytes=(
            # FSDP2: the layer's own and the next layer's gathered parameters (ZeRO-3; on
            # one rank nothing is prefetched; its unsharded gradient is in the workspace);
            # DeepSpeed: two gathered layers and
            # one unsharded gradient (ZeRO-3), one unsharded gradient (ZeRO-2)
            ((2 if zero.shard_ranks > 1 else 1) * psi * a if zero.stage == 3 else 0)
            # FSDP2 offloaded: the fp32 shard copied to the device for the all-gather
            + (FP32_BYTES * psi / zero.shard_ranks if zero.params_on_host else 0.0)
            if fsdp2
            else _deepspeed_layer_transient(zero.stage, psi, a, rank.counts)
        ),
        loss_transient_bytes=loss_transient,
        zero_output_transient_bytes=output_params * a if zero.stage == 3 and not fsdp2 else 0,
        output_is_embedding=model.tie_embeddings and layout.pp == 1,
        owner_imbalance_bytes=_owner_imbalance_bytes(
            model, layout, StateBytesPerParam.of(dtype).optimizer
        ),
        fsdp2_units=fsdp2,
        gathered_layer_bytes=psi * a if fsdp2 else 0.0,
        reduce_scatter_layer_bytes=psi * REDUCE_BYTES if fsdp2 else 0.0,
        reduce_scatter_output_bytes=(
            (output_params + rank.counts.final_norm) * REDUCE_BYTES
            if fsdp2 and not tied_root
            else 0.0
        ),
        held_output_grad_bytes=output_params * a if tied_root else 0.0,
        budget_bytes=budget,
        reserved_bytes=reserved,
        host_budget_bytes=host_budget_bytes(cluster, planner),
        offload=offload_enabled(cluster, planner),
        full_recompute=full_recompute_runs(layout),
        host_link=rates.host_link,
        gpus_per_node=gpn,
    )


def costs_for(cfg: Config, layout: Layout) -> LayoutCosts:
    """layout_costs from the root config (checkpoint staging counts when checkpointing)."""
    return layout_costs(
        cfg.model, cfg.cluster, cfg.train, cfg.planner, layout, cfg.checkpoint.every > 0
    )
