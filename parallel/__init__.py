"""Execute a plan's layout over many ranks: DeviceMesh, ZeRO (FSDP2 / DeepSpeed), pipeline
schedules, Ulysses sequence parallelism and DTensor tensor parallelism.

    build_parallel_runtime(model_cfg, train_cfg, plan, device, dtype, dist_ctx) -> TrainRuntime

parallelize(model, mesh, plan, ...) applies one stage's transformations in STYLE.md's order.
"""

from parallel.dims import ParallelDims, stage_layers
from parallel.parallelize import parallelize
from parallel.runtime import ParallelRuntime, build_parallel_runtime

__all__ = [
    "ParallelDims",
    "ParallelRuntime",
    "build_parallel_runtime",
    "parallelize",
    "stage_layers",
]
