"""build_runtime: the one place that picks the runtime executing a plan's layout."""

from __future__ import annotations

import torch
import torch.distributed as dist

from configs.errors import ConfigError
from configs.schema import ModelConfig, TrainConfig
from framework.components.distributed import DistContext
from framework.runtime.base import TrainRuntime
from framework.runtime.local import build_local_runtime
from parallel.dims import ParallelDims
from planner.plan import Plan


def build_runtime(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    plan: Plan,
    device: torch.device,
    dtype: torch.dtype,
    dist_ctx: DistContext,
) -> TrainRuntime:
    """The runtime for the plan's layout.

    - one rank, not sharded (or not under torchrun): LocalRuntime (framework/runtime/local.py);
    - zero_backend deepspeed: DeepSpeedRuntime (framework/runtime/deepspeed_backend.py);
    - otherwise the torch-native ParallelRuntime (framework/runtime/fsdp.py): FSDP2/ZeRO-0/1,
      TP, Ulysses and pipeline schedules; also one rank when the plan asks for FSDP2
      (zero_stage >= 2: bf16 parameters on GPU).
    """
    layout = plan.layout
    sharded = layout.zero_backend == "deepspeed" or layout.zero_stage >= 2
    in_group = dist.is_available() and dist.is_initialized()
    if layout.world_size == 1 and not (sharded and in_group):
        if layout.state_offload != "none":
            raise ConfigError(
                "layout.state_offload",
                f"{layout.state_offload} runs under {layout.zero_backend} in a process group;"
                " start it with memplan train (torchrun), even on one GPU",
            )
        return build_local_runtime(model_cfg, train_cfg, plan, device, dtype)
    if not in_group:
        raise ConfigError(
            "layout", f"dp*tp*pp*sp={layout.world_size} ranks need torchrun (memplan train)"
        )
    dims = ParallelDims.from_plan(plan, model_cfg, train_cfg.seq_len, dist_ctx.world_size)
    if layout.zero_backend == "deepspeed":
        from framework.runtime.deepspeed_backend import DeepSpeedRuntime  # imports deepspeed

        return DeepSpeedRuntime(model_cfg, train_cfg, plan, device, dtype)
    from framework.runtime.fsdp import ParallelRuntime

    mesh = dims.build_mesh(device.type)
    return ParallelRuntime(model_cfg, train_cfg, plan, dims, mesh, device, dtype)
