"""The global gradient norm over every rank's gradients, and clipping by it.

A rank's gradients are a mix of plain tensors (replicated: the same on every rank that holds
them) and DTensors sharded over some mesh dimensions (FSDP over dp_sp, TP over tp). Squares
are summed locally per (mesh, sharded dims), all-reduced over exactly those dims (so no
replica is counted twice), then summed over pipeline stages. Parameters that are copies
of another stage's (a tied embedding on the last stage) are left out by the caller.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.distributed.tensor import DTensor, Replicate


def global_grad_norm(
    params: Iterable[nn.Parameter], pp_group: ProcessGroup | None, device: torch.device
) -> Tensor:
    """sqrt(sum of squared gradient entries) over the whole model (identical on every rank)."""
    groups: dict[tuple[int, tuple[int, ...]], list[Tensor]] = {}
    meshes = {}
    for param in params:
        grad = param.grad
        if grad is None:
            continue
        if isinstance(grad, DTensor):
            if any(p.is_partial() for p in grad.placements):
                grad = grad.redistribute(
                    placements=[Replicate() if p.is_partial() else p for p in grad.placements]
                )
            # Every non-replicated dim splits the entries (Shard, and FSDP x TP's strided
            # shard, which is not a Shard subclass in every torch version).
            dims = tuple(i for i, p in enumerate(grad.placements) if not p.is_replicate())
            key = (id(grad.device_mesh), dims)
            meshes[key[0]] = grad.device_mesh
            groups.setdefault(key, []).append(grad.to_local())
        else:
            groups.setdefault((0, ()), []).append(grad)
    total = torch.zeros((), device=device, dtype=torch.float32)
    for (mesh_id, dims), grads in groups.items():
        norms = torch._foreach_norm([g.float() for g in grads], 2.0)
        # on the collective's device: offloaded states (FSDP2 CPUOffloadPolicy) keep their
        # gradient shards in host memory, and NCCL reduces no CPU tensors
        squares = torch.stack(norms).pow(2).sum().to(device)
        for dim in dims:
            dist.all_reduce(squares, group=meshes[mesh_id].get_group(dim))
        total += squares
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(total, group=pp_group)
    return total.sqrt()


@torch.no_grad()
def clip_grads_(params: Iterable[nn.Parameter], max_norm: float, total_norm: Tensor) -> None:
    """Scale gradients by min(1, max_norm / (total_norm + 1e-6)), as clip_grad_norm_ does."""
    if max_norm <= 0 or math.isinf(max_norm):
        return
    coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    on_device: dict[torch.device, Tensor] = {}  # offloaded gradients: one copy to the host
    for param in params:
        if param.grad is not None:
            grad = param.grad
            local = grad.to_local() if isinstance(grad, DTensor) else grad
            if local.device not in on_device:
                on_device[local.device] = coef.to(local.device)
            local.mul_(on_device[local.device])
