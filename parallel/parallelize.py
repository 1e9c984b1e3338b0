"""parallelize(): the plan's layout applied to one (stage) model, in a fixed, visible order.

    tensor parallel (tp) -> sequence parallel (Ulysses, sp) -> activation policy (offload/
    recompute, per layer) -> [compile: not planned] -> ZeRO-2/3 (FSDP2 over dp x sp)

Runs on the meta device, before `to_empty()` + `init_weights()`. Pipeline splitting wraps it
from outside (framework.runtime.fsdp builds one StageModel per local stage and parallelises each).
ZeRO-0/1 and the DeepSpeed backend do not transform the module: they act on gradients and
the optimizer (parallel.zero, framework.runtime.deepspeed_backend).
"""

from __future__ import annotations

import logging

import torch

from framework.components.logs import log_rank0
from offload import ActivationRuntime, apply_layer_policies
from parallel.dims import ParallelMesh
from parallel.stage_model import StageModel
from parallel.tensor_parallel import apply_tensor_parallel
from parallel.ulysses import apply_ulysses
from parallel.zero import apply_fsdp
from planner.plan import Plan

logger = logging.getLogger(__name__)

# Schedules that split backward into input- and weight-gradient passes.
WEIGHT_SPLIT_SCHEDULES = ("interleaved_zero_bubble", "zbv_zero_bubble")


def parallelize(
    model: StageModel,
    mesh: ParallelMesh,
    plan: Plan,
    param_dtype: torch.dtype,
    activation_runtime: ActivationRuntime,
) -> None:
    """Apply plan.layout and plan.layers to `model` (a whole model or one pipeline stage)."""
    layout = plan.layout
    apply_tensor_parallel(model, mesh.tp)
    apply_ulysses(model, mesh.sp.get_group())
    apply_layer_policies(model.layers.values(), plan.layers, activation_runtime, layout.sp)
    if layout.zero_stage >= 2:
        extra = ("loss",) if model.is_last else ()
        apply_fsdp(
            model,
            mesh.dp_sp,
            reshards_after_forward(plan),
            param_dtype,
            extra,
            offload_states=layout.state_offload == "all",
        )


def reshards_after_forward(plan: Plan) -> bool:
    """ZeRO-3 re-gathers parameters for backward, except under the zero-bubble schedules:
    their weight-gradient pass (torch.distributed.pipelining) runs after later micro-batches'
    forwards, and FSDP resharding in between gives wrong weight gradients (measured here,
    torch 2.13; torchtitan never reshards after forward under pipelining). There parameters
    stay gathered from forward until the step's gradients are reduced: ZeRO-2 behaviour
    within the step, sharded between steps as with ZeRO-3."""
    layout = plan.layout
    if layout.zero_stage != 3:
        return False
    if layout.pp_schedule in WEIGHT_SPLIT_SCHEDULES:
        log_rank0(
            logger,
            f"zero_stage=3 with pp_schedule={layout.pp_schedule}: parameters stay gathered "
            "from forward to the weight-gradient pass (ZeRO-2 within the step)",
        )
        return False
    return True
