"""Lay a model out over many ranks: DeviceMesh and dims (parallel.dims), ZeRO via FSDP2
(parallel.zero), pipeline schedules (parallel.pipeline), Ulysses sequence parallelism
(parallel.ulysses) and DTensor tensor parallelism (parallel.tensor_parallel).

parallelize(model, mesh, plan, ...) applies one stage's transformations in a fixed order:
tensor/sequence parallel -> activation policy (offload/) -> ZeRO. The runtimes that drive a
step over these pieces live in framework/runtime/.
"""

from parallel.dims import ParallelDims, stage_layers
from parallel.parallelize import parallelize

__all__ = ["ParallelDims", "parallelize", "stage_layers"]
