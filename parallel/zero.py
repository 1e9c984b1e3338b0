"""ZeRO on the "dp_sp" ranks with torch: FSDP2 for stages 2 and 3, replicated parameters with
an all-reduce of gradients for stages 0 and 1 (stage 1 also shards the optimizer state).

| stage | parameters | gradients                     | optimizer state          |
|-------|------------|-------------------------------|--------------------------|
| 0     | replicated | all-reduced after the last    | replicated               |
|       |            | micro-batch                   |                          |
| 1     | replicated | all-reduced                   | each parameter on one    |
|       |            |                               | owner; owners broadcast  |
|       |            |                               | the updated values       |
| 2     | sharded between steps, kept unsharded from forward to backward; grads sharded |
| 3     | sharded, re-gathered for backward (reshard_after_forward=True)                |

With the plan's state_offload "all" (ZeRO-2/3), FSDP2's CPUOffloadPolicy keeps the sharded
parameters, gradients and (through the optimizer built on them) the optimizer state in host
memory: shards are copied to the device before each all-gather, gradient shards back after
each reduce-scatter, and the optimizer step runs on the CPU. Pinned memory on CUDA only.

FSDP2 uses bf16 parameters with fp32 gradient reduction on GPU, fp32 throughout on CPU.
Stages 0/1 keep fp32 parameters and run under bf16 autocast on GPU; the planner does not
account for that precision, so it proposes them only in fp32 (planner/layouts.py), and a
hand-made bf16 plan with them uses more memory than its prediction.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor

BUCKET_BYTES = 25 * 2**20  # gradient all-reduce bucket (DDP's default size)


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    reshard_after_forward: bool,
    param_dtype: torch.dtype,
    extra_forward_methods: tuple[str, ...] = (),
    offload_states: bool = False,
) -> None:
    """fully_shard each decoder layer, then the root (embedding, final norm, output).

    reshard_after_forward: True for ZeRO-3 (re-gather for backward), False for ZeRO-2.
    extra_forward_methods: root methods that use root parameters outside forward (the loss),
    so FSDP gathers them around those calls too.
    offload_states: the sharded states in host memory (CPUOffloadPolicy; module doc).
    """
    mp_policy = MixedPrecisionPolicy(
        param_dtype=None if param_dtype == torch.float32 else param_dtype,
        reduce_dtype=torch.float32,
    )
    device_type = mesh.device_type
    offload = (
        CPUOffloadPolicy(pin_memory=device_type == "cuda") if offload_states else OffloadPolicy()
    )
    for module in [*model.layers.values(), model]:
        fully_shard(
            module,
            mesh=mesh,
            reshard_after_forward=reshard_after_forward,
            mp_policy=mp_policy,
            offload_policy=offload,
        )
    for name in extra_forward_methods:
        register_fsdp_forward_method(model, name)


def local_tensor(tensor: Tensor) -> Tensor:
    """The shard a rank holds (the tensor itself when it is not a DTensor)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class GradientAllReduce:
    """Average the gradients of replicated parameters over a group (ZeRO stages 0 and 1),
    in flattened buckets of at most BUCKET_BYTES. Tensor-parallel DTensors reduce their
    local shards (the same shard on every rank of the group)."""

    def __init__(self, params: list[nn.Parameter], group: ProcessGroup) -> None:
        self.params = params
        self.group = group
        self.size = dist.get_world_size(group)

    def __call__(self) -> None:
        if self.size == 1:
            return
        grads = []
        for param in self.params:
            if param.grad is None:  # every rank must contribute the same buckets
                param.grad = torch.zeros_like(param)
            grads.append(local_tensor(param.grad))
        for bucket in _buckets(grads):
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat, group=self.group)  # gloo has no AVG: sum, then scale
            flat.div_(self.size)
            for grad, reduced in zip(bucket, _unflatten_dense_tensors(flat, bucket), strict=True):
                grad.copy_(reduced)


def _buckets(tensors: list[Tensor]) -> list[list[Tensor]]:
    """Consecutive runs of same-dtype tensors of at most BUCKET_BYTES (one tensor may exceed)."""
    buckets: list[list[Tensor]] = []
    size = 0
    for tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if not buckets or buckets[-1][0].dtype != tensor.dtype or size + nbytes > BUCKET_BYTES:
            buckets.append([])
            size = 0
        buckets[-1].append(tensor)
        size += nbytes
    return buckets


def partition_parameters(params: list[nn.Parameter], num_ranks: int) -> list[int]:
    """Owner rank of each parameter for ZeRO-1: largest first onto the least-loaded rank
    (ties to the lower rank), so every rank computes the same assignment."""
    owners = [0] * len(params)
    load = [0] * num_ranks
    order = sorted(range(len(params)), key=lambda i: (-local_tensor(params[i]).numel(), i))
    for index in order:
        rank = min(range(num_ranks), key=lambda r: (load[r], r))
        owners[index] = rank
        load[rank] += local_tensor(params[index]).numel()
    return owners


class OwnerBroadcast:
    """After a ZeRO-1 step, each owner sends the parameters it updated to the group: one
    flattened broadcast per owner."""

    def __init__(self, params: list[nn.Parameter], owners: list[int], group: ProcessGroup):
        self.group = group
        self.by_owner: dict[int, list[nn.Parameter]] = {}
        for param, owner in zip(params, owners, strict=True):
            self.by_owner.setdefault(owner, []).append(param)

    @torch.no_grad()
    def __call__(self) -> None:
        for owner, params in self.by_owner.items():
            tensors = [local_tensor(p) for p in params]
            flat = _flatten_dense_tensors(tensors)
            dist.broadcast(flat, src=dist.get_global_rank(self.group, owner), group=self.group)
            if dist.get_rank(self.group) != owner:
                values = _unflatten_dense_tensors(flat, tensors)
                for tensor, value in zip(tensors, values, strict=True):
                    tensor.copy_(value)
