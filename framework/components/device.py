"""Which device and dtype a worker computes with."""

import os

import torch

from configs.errors import ConfigError
from configs.schema import ClusterConfig, TrainConfig


def resolve_device(cluster: ClusterConfig) -> torch.device:
    """cuda:LOCAL_RANK for a CUDA cluster (error if there is none), else the CPU."""
    if cluster.device == "cpu":
        return torch.device("cpu")
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
