"""ParallelRuntime: one optimizer step of a plan's layout over dp x tp x pp x sp ranks.

    ParallelRuntime(model_cfg, train_cfg, plan, dims, mesh, device, dtype)

(made by framework/runtime/build.py) builds the mesh (parallel.dims), one StageModel per
local pipeline stage (the whole model when pp = 1), parallelises each (parallel.parallelize),
materialises it with the single-process initial weights, and one AdamW + LR schedule per
stage model. A step (framework/runtime/step.py):

    slice this sp rank's sequence chunk -> micro-batches (plain loop, or the pipeline
    schedule) -> tied-embedding gradient sum -> ZeRO-0/1 gradient all-reduce -> global
    gradient norm + clipping -> optimizer and schedule -> ZeRO-1 owner broadcast

The reported loss is the mean over the global batch: every (pp, dp, sp) rank contributes its
rows' mean / (dp x sp) from the last stage (tp ranks repeat it), summed onto rank 0.
Validation (evaluate) runs the same layout forward-only: the pipeline through a forward-only
schedule (parallel.pipeline.Pipeline.evaluator), the last stage's summed loss and token
count all-reduced over the same ranks.
The torch-native backend (zero_backend fsdp2); deepspeed layouts run in
framework/runtime/deepspeed_backend.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.fsdp import FSDPModule

from configs.schema import ModelConfig, TrainConfig
from framework.components.evaluation import EvalSums, ValidationSet, summed_loss
from framework.components.optim import build_lr_scheduler, build_optimizer
from framework.components.weights import initialize_weights
from framework.runtime.base import StepOutput, autocast_context
from framework.runtime.state import ModelState, OptimizerState, SchedulerState
from framework.runtime.step import (
    accumulate_microbatches,
    forward_only,
    run_evaluation,
    run_train_step,
)
from offload import ActivationRuntime, reserve_plan_host_memory
from parallel.dims import ParallelDims, ParallelMesh, stage_layers
from parallel.grad_norm import clip_grads_, global_grad_norm
from parallel.parallelize import parallelize
from parallel.pipeline import EmbeddingGroup, Pipeline
from parallel.stage_model import StageModel
from parallel.ulysses import sequence_chunk
from parallel.zero import GradientAllReduce, OwnerBroadcast, partition_parameters
from planner.plan import Plan
from planner.schedules import chunk_inflight, rank_stages

logger = logging.getLogger(__name__)


class ParallelRuntime:
    """FSDP2/ZeRO-0/1 x TP x Ulysses x pipeline execution of one plan (see module doc)."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        plan: Plan,
        dims: ParallelDims,
        mesh: ParallelMesh,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        layout = plan.layout
        self.device, self.dims, self.mesh = device, dims, mesh
        self.dp_rank, self.dp_size = mesh.dp.get_local_rank(), dims.dp
        self.sp_rank = mesh.sp.get_local_rank()
        self.micro_batch_size = layout.micro_batch_size
        self.num_microbatches = layout.num_microbatches
        self.zero_stage = layout.zero_stage
        self.grad_clip = train_cfg.grad_clip
        self.pre_update_hooks: list[Callable[[], None]] = []
        # FSDP2 casts parameters itself; ZeRO-0/1 keep fp32 parameters under autocast.
        fsdp = layout.zero_stage >= 2
        self.autocast_dtype = torch.float32 if fsdp else dtype
        activation_dtype = dtype if fsdp else torch.float32

        self.states_device = torch.device("cpu") if layout.state_offload == "all" else device
        stages = stage_layers(plan)
        pp_rank = mesh.pp.get_local_rank()
        self.activation_runtime = ActivationRuntime(fetch=plan.layout.activation_fetch)
        self.modules: list[StageModel] = []
        for stage in rank_stages(pp_rank, layout.pp, layout.virtual_stages, layout.pp_schedule):
            with torch.device("meta"):
                model = StageModel(
                    model_cfg, stage, layout.num_stages, stages[stage], train_cfg.loss_chunk_tokens
                )
            parallelize(model, mesh, plan, dtype, self.activation_runtime)
            # offloaded states: FSDP2 keeps the sharded parameters in host memory, the
            # buffers (RoPE frequencies) on the device
            model.to_empty(device=self.states_device)
            for module in model.modules():
                for name, buffer in module.named_buffers(recurse=False):
                    module._buffers[name] = buffer.to(device)
            initialize_weights(model, model_cfg, train_cfg.seed)
            self.modules.append(model)
        # host slabs for offloaded activations, allocated now: one per layer and micro-batch
        # of its stage in flight at once under the schedule (planner/schedules.py)
        in_flight = chunk_inflight(
            layout.pp_schedule, pp_rank, layout.pp, layout.virtual_stages, layout.num_microbatches
        )
        slabs = {
            int(name): count
            for model, count in zip(self.modules, in_flight, strict=True)
            for name in model.layers
        }
        reserve_plan_host_memory(self.activation_runtime, device, model_cfg, plan, slabs)

        self.pipeline = None
        if layout.pp > 1:
            shape = (layout.micro_batch_size, train_cfg.seq_len // dims.sp, model_cfg.hidden_size)
            self.pipeline = Pipeline(
                self.modules,
                layout.pp_schedule,
                layout.num_microbatches,
                mesh.pp.get_group(),
                device,
                shape,
                activation_dtype,
            )
        self.embedding_group = None
        if model_cfg.tie_embeddings and layout.pp > 1:
            owners = {
                stage: r
                for r in range(layout.pp)
                for stage in rank_stages(r, layout.pp, layout.virtual_stages, layout.pp_schedule)
            }
            last_pp_rank = owners[layout.num_stages - 1]
            self.embedding_group = EmbeddingGroup(mesh, self.modules, last_pp_rank, device)

        dp_sp_group = mesh.dp_sp.get_group()
        self.optimizers: list[torch.optim.Optimizer] = []
        self.after_update: list[Callable[[], None]] = []
        self.reduce_grads: list[Callable[[], None]] = []
        for model in self.modules:
            params = [p for p in model.parameters() if p.requires_grad]
            if layout.zero_stage <= 1:
                self.reduce_grads.append(GradientAllReduce(params, dp_sp_group))
            optimized: nn.Module = model
            if layout.zero_stage == 1:  # this rank's optimizer holds its own parameters only
                owners = partition_parameters(params, dims.dp_sp)
                me = mesh.dp_sp.get_local_rank()
                optimized = nn.ParameterList(
                    p for p, owner in zip(params, owners, strict=True) if owner == me
                )
                self.after_update.append(OwnerBroadcast(params, owners, dp_sp_group))
            self.optimizers.append(build_optimizer([optimized], train_cfg, self.states_device))
        self.schedulers = [build_lr_scheduler(opt, train_cfg) for opt in self.optimizers]
        # The tied copy's gradient equals the embedding's after the sum: count it once.
        self.norm_params = [
            p
            for m in self.modules
            for name, p in m.named_parameters()
            if not (m.holds_tied_copy and name == "output.weight")
        ]
        self.loss_group = mesh.pp_dp_sp.get_group()
        self.pp_group = mesh.pp.get_group() if layout.pp > 1 else None

    def train_step(self, inputs: Tensor, targets: Tensor) -> StepOutput:
        rows = inputs.shape[0]
        if rows != self.micro_batch_size * self.num_microbatches:
            raise ValueError(
                f"train_step got {rows} rows; the layout needs micro_batch_size*"
                f"num_microbatches={self.micro_batch_size}*{self.num_microbatches}"
            )
        return run_train_step(self, self.pre_update_hooks, inputs, targets)

    # -- the phases of run_train_step ----------------------------------------------------

    def forward_backward(self, inputs: Tensor, targets: Tensor) -> Tensor | None:
        """This sp rank's sequence chunk; the pipeline schedule, or accumulation over the
        micro-batches of the single (whole) model."""
        inputs = sequence_chunk(inputs, self.sp_rank, self.dims.sp).to(self.device)
        targets = sequence_chunk(targets, self.sp_rank, self.dims.sp).to(self.device)
        with autocast_context(self.device, self.autocast_dtype):
            if self.pipeline is not None:
                return self.pipeline.step(inputs, targets)
            (model,) = self.modules
            return accumulate_microbatches(
                lambda x, y: model.loss(model(x), y),
                inputs,
                targets,
                self.micro_batch_size,
                self.device,
            )

    def finish_gradients(self) -> Tensor:
        """Tied-embedding gradient sum, ZeRO-0/1 all-reduce, global norm, clipping."""
        if self.embedding_group is not None:
            self.embedding_group()
        for reduce in self.reduce_grads:
            reduce()
        grad_norm = global_grad_norm(self.norm_params, self.pp_group, self.device)
        clip_grads_([p for m in self.modules for p in m.parameters()], self.grad_clip, grad_norm)
        return grad_norm

    def update(self) -> None:
        """Every local stage's optimizer and schedule, then ZeRO-1's owner broadcasts."""
        for optimizer, scheduler in zip(self.optimizers, self.schedulers, strict=True):
            optimizer.step()
            scheduler.step()
        for update in self.after_update:
            update()
        for model in self.modules:
            model.zero_grad(set_to_none=True)

    def global_loss(self, local_loss: Tensor | None) -> Tensor:
        """Sum of every last-stage rank's mean / (dp*sp) over (pp, dp, sp): rank 0 has it."""
        share = torch.zeros((), device=self.device, dtype=torch.float32)
        if local_loss is not None:
            share += local_loss.float() / self.dims.dp_sp
        dist.all_reduce(share, group=self.loss_group)
        return share

    # --------------------------------------------------------------------------------------

    def evaluate(self, validation: ValidationSet) -> EvalSums:
        """This dp rank's windows (every sp rank its sequence chunk of them), micro-batch by
        micro-batch, or through a forward-only pipeline schedule of num_microbatches; the
        last stage's sums all-reduced over (pp, dp, sp) as global_loss does (tp repeats)."""
        batch_sums: Callable[[Tensor, Tensor], Tensor | None] = self._micro_sums
        per_call = self.micro_batch_size
        if self.pipeline is not None:
            run = self.pipeline.evaluator()

            def batch_sums(inputs: Tensor, targets: Tensor) -> Tensor | None:
                return run(self._local(inputs).to(self.device), self._local(targets))

            per_call *= self.num_microbatches
        batches = validation.batches(self.dp_rank, self.dp_size, per_call)
        with forward_only(self.modules), autocast_context(self.device, self.autocast_dtype):
            sums = run_evaluation(batch_sums, batches, self.device, self._reduce_sums)
        if self.zero_stage >= 2:
            # ZeRO-2 keeps parameters gathered after a forward until its backward; without
            # one they would stay gathered into the next step: shard them again
            for model in self.modules:
                for module in model.modules():
                    if isinstance(module, FSDPModule):
                        module.reshard()
        return sums

    def _local(self, tokens: Tensor) -> Tensor:
        """This sp rank's contiguous chunk of every sequence (still on the CPU)."""
        return sequence_chunk(tokens, self.sp_rank, self.dims.sp)

    def _micro_sums(self, inputs: Tensor, targets: Tensor) -> Tensor:
        (model,) = self.modules
        hidden = model(self._local(inputs).to(self.device, non_blocking=True))
        return summed_loss(model.loss, hidden, self._local(targets))

    def _reduce_sums(self, total: Tensor) -> None:
        dist.all_reduce(total, group=self.loss_group)

    def stateful_parts(self) -> dict[str, Stateful]:
        return {
            "model": ModelState(self.modules),
            "optimizer": OptimizerState(self.modules, self.optimizers),
            "lr_scheduler": SchedulerState(self.schedulers),
        }

    def parameters(self) -> list[nn.Parameter]:
        """This rank's parameters (local stages; DTensor shards under FSDP/TP)."""
        return [p for m in self.modules for p in m.parameters()]

    def close(self) -> None:
        """Drop the offload engines' hooks; process groups belong to the caller."""
        self.activation_runtime.remove()
