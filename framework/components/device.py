"""Which device and dtype a worker computes with."""

import os

import torch

from configs.errors import ConfigError
from configs.schema import ClusterConfig, TrainConfig

ALLOCATOR_CONF_ENV = "PYTORCH_CUDA_ALLOC_CONF"
EXPANDABLE_SEGMENTS = "expandable_segments:True"
"""The CUDA caching allocator setting the runtime uses unless the user chose one: segments
that grow in place leave far less fragmentation than fixed-size blocks, which is what the
planner's planner.fragmentation_reserve_fraction (the plan's reserved_bytes) assumes."""


def configure_allocator() -> str:
    """Set PYTORCH_CUDA_ALLOC_CONF to EXPANDABLE_SEGMENTS unless the user set it (before the
    first CUDA allocation, which reads it); returns the setting in effect."""
    return os.environ.setdefault(ALLOCATOR_CONF_ENV, EXPANDABLE_SEGMENTS)


def resolve_device(cluster: ClusterConfig) -> torch.device:
    """cuda:LOCAL_RANK for a CUDA cluster (error if there is none; the allocator configured
    by configure_allocator first), else the CPU."""
    if cluster.device == "cpu":
        return torch.device("cpu")
    configure_allocator()
    if not torch.cuda.is_available():
        raise ConfigError(
            "cluster.device", "cuda requested but no CUDA device is available; use cluster=cpu"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def resolve_dtype(train: TrainConfig, device: torch.device) -> torch.dtype:
    """Compute dtype: train.dtype, where auto means bf16 on GPU and fp32 on CPU."""
    if train.dtype == "fp32" or (train.dtype == "auto" and device.type == "cpu"):
        return torch.float32
    return torch.bfloat16


def dtype_name(dtype: torch.dtype) -> str:
    """'bf16' or 'fp32' (the names plans and configs use)."""
    return {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
