"""The runtimes: what executes one optimizer step of a plan's layout.

    build_runtime(model_cfg, train_cfg, plan, device, dtype, dist_ctx) -> TrainRuntime

Modules: base (TrainRuntime, StepOutput), step (the one train-step loop every runtime
runs), state (checkpointable state by parameter name), local (one process), fsdp (torch
FSDP2/ZeRO-0/1 x TP x Ulysses x pipeline), deepspeed_backend (DeepSpeed ZeRO-0..3), build
(picks one). The trainer sits above this package; parallel/ and offload/ below it.
"""

from framework.runtime.base import StepOutput, TrainRuntime, autocast_context
from framework.runtime.build import build_runtime
from framework.runtime.local import LocalRuntime, build_local_runtime
from framework.runtime.step import accumulate_microbatches, run_train_step

__all__ = [
    "LocalRuntime",
    "StepOutput",
    "TrainRuntime",
    "accumulate_microbatches",
    "autocast_context",
    "build_local_runtime",
    "build_runtime",
    "run_train_step",
]
