"""Parameter counts (analytic, exactly the parameters framework/components/model.py creates) and
model-state bytes per GPU under ZeRO.

Layer parameters (H hidden, F ffn, q = heads * head_dim, kv = kv_heads * head_dim):

    attention_norm, ffn_norm        2H            replicated over tp
    wq, wk, wv                      H (q + 2kv)   (+ q + 2kv bias with qkv_bias)  column-split
    wo                              q H           (+ H bias with out_bias, replicated) row-split
    w1, w3, w2                      3 H F         column/row-split

Outside the layers: the embedding V H (first pipeline stage), the final norm H and the output
projection V H (last stage; absent with tied embeddings, where the last stage holds its own
copy of the embedding when pp > 1). Tensor parallelism splits the decoder layers' linears
(Megatron column/row) and replicates norms, embedding and output projection; ZeRO shards
whatever a rank holds over its dp x sp ranks (they all see different tokens and reduce
gradients together).

Model states per GPU (Psi parameters on that GPU, Nd = dp x sp ranks sharing them):

    bf16 mixed precision (K = 12): params 2 Psi, grads 2 Psi, fp32 master + Adam m, v 12 Psi
    fp32 (cluster.device=cpu):     params 4 Psi, grads 4 Psi, Adam m, v 8 Psi (no master copy)

ZeRO-1 shards the optimizer state, ZeRO-2 also the gradients, ZeRO-3 also the parameters:
16 Psi, 4 Psi + 12 Psi/Nd, 2 Psi + 14 Psi/Nd, 16 Psi/Nd for both dtypes' totals (the ZeRO
paper's table). FSDP2 (ZeRO-2/3 here) allocates 16 Psi/Nd of states in both dtypes (fp32
sharded parameters, fp32 gradient shards, m, v: fsdp2_state_bytes, checked against torch's
FSDPMemTracker) and gathers the compute-dtype parameters per unit as working set. ZeRO-1
assigns parameters whole to owners (owner_partition_max): the busiest owner's optimizer
state can exceed 1/Nd of the total (llama3_2_1b on 2 ranks: its 262M-parameter embedding).
"""

from __future__ import annotations

from dataclasses import dataclass

from configs.schema import ModelConfig


@dataclass(frozen=True)
class StateBytesPerParam:
    """Bytes per parameter of each model state for one training dtype."""

    params: int
    grads: int
    optimizer: int

    @staticmethod
    def of(dtype: str) -> StateBytesPerParam:
        """bf16: 2 + 2 + 12 (fp32 master, m, v); fp32: 4 + 4 + 8 (m, v)."""
        if dtype == "bf16":
            return StateBytesPerParam(params=2, grads=2, optimizer=12)
        if dtype == "fp32":
            return StateBytesPerParam(params=4, grads=4, optimizer=8)
        raise ValueError(f"dtype={dtype!r}; allowed: bf16, fp32")


@dataclass(frozen=True)
class ModelStateBytes:
    """Parameter, gradient and optimizer-state bytes on one GPU."""

    params: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def shard_numel(count: int, ranks: int) -> int:
    """Elements of one rank's shard of `count` elements over `ranks` (ceil: the last rank's
    shard is padded)."""
    return -(-count // ranks)


def model_state_bytes(
    num_params: int, shard_ranks: int, zero_stage: int, dtype: str
) -> ModelStateBytes:
    """Model states of `num_params` parameters held by one GPU under ZeRO-`zero_stage`,
    sharded over `shard_ranks` ranks (the ZeRO paper's Nd)."""
    per = StateBytesPerParam.of(dtype)
    shard = shard_numel(num_params, shard_ranks)
    return ModelStateBytes(
        params=per.params * (shard if zero_stage >= 3 else num_params),
        grads=per.grads * (shard if zero_stage >= 2 else num_params),
        optimizer=per.optimizer * (shard if zero_stage >= 1 else num_params),
    )


def fsdp2_state_bytes(num_params: int, shard_ranks: int) -> ModelStateBytes:
    """Model states of `num_params` parameters under FSDP2 (ZeRO-2/3), as it allocates them
    in both dtypes: the sharded parameter is the fp32 master (4 / Nd), its gradient shard is
    fp32 (4 / Nd: gradients are reduced in fp32), Adam's m and v 8 / Nd. The compute-dtype
    copies FSDP2 all-gathers per unit are working set, not states (planner/costs.py)."""
    shard = shard_numel(num_params, shard_ranks)
    return ModelStateBytes(params=4 * shard, grads=4 * shard, optimizer=8 * shard)


def pinned_bytes(num_bytes: int) -> int:
    """What torch's caching host allocator takes for a pinned allocation of num_bytes: the
    next power of two (its default; PYTORCH_CUDA_ALLOC_CONF's pinned_max_round_threshold_mb,
    where a torch has it, changes that: not assumed)."""
    return 1 << (num_bytes - 1).bit_length() if num_bytes > 1 else num_bytes


def pinned_shard_bytes(sizes: list[int], shard_ranks: int, element_bytes: int) -> int:
    """Pinned bytes of one rank's shard of each tensor (`sizes`: element counts), each its
    own allocation, as FSDP2 and the checkpoint snapshot pin them."""
    return sum(pinned_bytes(element_bytes * shard_numel(n, shard_ranks)) for n in sizes)


def no_decay_params(model: ModelConfig) -> int:
    """Parameters framework/components/optim.py gives no weight decay (norms and biases): the
    second of the two flat groups DeepSpeed partitions."""
    per_layer = 2 * model.hidden_size
    if model.qkv_bias:
        per_layer += (model.num_heads + 2 * model.num_kv_heads) * model.resolved_head_dim
    if model.out_bias:
        per_layer += model.hidden_size
    return model.num_layers * per_layer + model.hidden_size


def deepspeed_offload_state_bytes(
    num_params: int, shard_ranks: int, zero_stage: int, dtype_bytes: int
) -> ModelStateBytes:
    """Model states of `num_params` parameters left on the GPU by DeepSpeed's
    offload_optimizer, as its estimators with cpu_offload=True count them: the compute-dtype
    parameters (2 Psi in bf16), ZeRO-3 their shard (2 Psi / Nd); gradients and optimizer
    state live on the host (16 Psi / Nd: fp32 master, m, v, fp32 gradient partition)."""
    whole = dtype_bytes * num_params
    if zero_stage == 2:
        return ModelStateBytes(params=whole, grads=0, optimizer=0)
    if zero_stage == 3:
        return ModelStateBytes(
            params=dtype_bytes * shard_numel(num_params, shard_ranks), grads=0, optimizer=0
        )
    raise ValueError(f"zero_stage={zero_stage}; DeepSpeed offloads the optimizer at 2 and 3")


def deepspeed_state_bytes(num_params: int, shard_ranks: int, zero_stage: int) -> ModelStateBytes:
    """Model states of `num_params` parameters under DeepSpeed ZeRO-2/3 in bf16 as DeepSpeed's
    own estimators count them (estimate_zero2/3_model_states_mem_needs: 2 Psi + 18 Psi / Nd
    and 18 Psi / Nd, the fp32 gradient partition included; ZeRO-3's 4 x largest-layer term is
    working set, planner/costs.py)."""
    shard = shard_numel(num_params, shard_ranks)
    if zero_stage == 2:  # bf16 params whole; bf16 + fp32 gradient partitions; master, m, v
        return ModelStateBytes(params=2 * num_params, grads=6 * shard, optimizer=12 * shard)
    if zero_stage == 3:
        return ModelStateBytes(params=2 * shard, grads=4 * shard, optimizer=12 * shard)
    raise ValueError(f"zero_stage={zero_stage}; DeepSpeed's estimators cover 2 and 3")


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of the model's parts on one tensor-parallel rank."""

    layer: int
    """One decoder layer (its tp shard)."""
    layer_matmul: int
    """The matmul weights of one decoder layer's tp shard (FLOPs and weight gradients)."""
    embedding: int
    """Token embedding (first stage)."""
    final_norm: int
    """Final RMSNorm (last stage)."""
    output: int
    """Output projection (last stage); the embedding's size when tied and pp > 1."""


def param_counts(model: ModelConfig, tp: int = 1, pp: int = 1) -> ParamCounts:
    """Exact parameter counts per part on one rank of a tp group (tp divides the widths)."""
    hidden, ffn = model.hidden_size, model.ffn_size
    q_width = model.num_heads * model.resolved_head_dim
    kv_width = model.num_kv_heads * model.resolved_head_dim
    qkv = hidden * (q_width + 2 * kv_width) + (q_width + 2 * kv_width if model.qkv_bias else 0)
    matmul = hidden * (q_width + 2 * kv_width) + q_width * hidden + 3 * hidden * ffn
    split = qkv + q_width * hidden + 3 * hidden * ffn
    replicated = 2 * hidden + (hidden if model.out_bias else 0)
    embedding = model.vocab_size * hidden
    # tied: the output projection is the embedding, a second copy only on a separate stage
    output = (embedding if pp > 1 else 0) if model.tie_embeddings else embedding
    return ParamCounts(
        layer=split // tp + replicated,
        layer_matmul=matmul // tp,
        embedding=embedding,
        final_norm=hidden,
        output=output,
    )


def total_params(model: ModelConfig) -> int:
    """Parameters of the whole model (a tied embedding counted once)."""
    counts = param_counts(model)
    return model.num_layers * counts.layer + counts.embedding + counts.final_norm + counts.output


def parameter_sizes(model: ModelConfig, tp: int, layers: int, first: bool, last: bool) -> list[int]:
    """Element counts of the parameter tensors one tp rank of a stage holds (`layers` decoder
    layers; `first`/`last`: the embedding / the final norm and output), tensor by tensor as
    framework/components/model.py creates them (the module docstring's table)."""
    hidden, ffn = model.hidden_size, model.ffn_size // tp
    q_width = model.num_heads // tp * model.resolved_head_dim
    kv_width = model.num_kv_heads // tp * model.resolved_head_dim
    layer = [hidden, q_width * hidden, kv_width * hidden, kv_width * hidden, hidden * q_width]
    layer += [hidden, ffn * hidden, ffn * hidden, hidden * ffn]
    if model.qkv_bias:
        layer += [q_width, kv_width, kv_width]
    if model.out_bias:
        layer.append(hidden)
    sizes = layer * layers
    embedding = model.vocab_size * hidden
    if first:
        sizes.append(embedding)
    if last:
        sizes.append(hidden)
        if not model.tie_embeddings or not first:  # tied on one stage: the same tensor
            sizes.append(embedding)
    return sizes


def owner_partition_max(sizes: list[int], ranks: int) -> int:
    """The most elements one rank owns when parameters are assigned whole, largest first to
    the least-loaded rank (parallel/zero.py partition_parameters, ZeRO-1 here)."""
    load = [0] * ranks
    for size in sorted(sizes, reverse=True):
        rank = min(range(ranks), key=lambda r: (load[r], r))
        load[rank] += size
    return max(load)
