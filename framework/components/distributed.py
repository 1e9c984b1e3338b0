"""Process-group set-up for workers started by torchrun (one rank per device)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """This worker's place in the job."""

    rank: int
    world_size: int
    local_rank: int


def init_distributed(device: torch.device, timeout_seconds: float = 600.0) -> DistContext:
    """Join the default process group when started by torchrun (nccl on CUDA, gloo on CPU).

    The store is torchrun's (env://), seen through a prefix per restart attempt: torchrun
    keeps one store across the restarts of an elastic job, and process groups are named by
    creation order, so a restarted worker would otherwise read the previous attempt's
    addresses for a group created after the default one (gloo then fails with "connection
    refused" connecting to a dead peer; measured with the checkpoint's own gloo group).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if "MASTER_ADDR" in os.environ and not dist.is_initialized():
        timeout = timedelta(seconds=timeout_seconds)
        store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            store=dist.PrefixStore(f"memplan/attempt_{attempt}", store),
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            device_id=device if device.type == "cuda" else None,
        )
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank)


def shutdown_distributed() -> None:
    """Destroy the default group (without it ~1 run in 7 ended in SIGABRT here)."""
    if dist.is_initialized():
        dist.destroy_process_group()
