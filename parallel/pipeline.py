"""Pipeline parallelism with torch.distributed.pipelining, wrapped around parallelize().

Each pp rank builds the StageModels it owns (parallel.stage_model deletes the rest), each
parallelised like a whole model, and one schedule runs them:

| pp_schedule             | torch schedule                | stages of pp rank r (v per rank) |
|-------------------------|-------------------------------|----------------------------------|
| gpipe                   | ScheduleGPipe                 | r                                |
| 1f1b                    | Schedule1F1B                  | r                                |
| interleaved_1f1b        | ScheduleInterleaved1F1B       | r, r + pp, ..., r + (v-1) pp     |
| interleaved_zero_bubble | ScheduleInterleavedZeroBubble | r, r + pp, ..., r + (v-1) pp     |
| zbv_zero_bubble         | ScheduleZBVZeroBubble         | r, 2 pp - 1 - r (V shape)        |

The last stage's loss is StageModel.loss (chunked cross-entropy, the micro-batch's token
mean); the schedule divides gradients by the number of micro-batches (scale_grads), so the
gradient is that of the mean over the rank's rows, as in one process.

Validation (`evaluator`) runs the same schedule class forward-only through its eval(), on
stages and a schedule built for that evaluation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)
from torch.distributed.pipelining.schedules import PipelineScheduleMulti, PipelineScheduleSingle

from framework.components.evaluation import summed_loss
from parallel.dims import ParallelMesh
from parallel.stage_model import StageModel
from parallel.zero import local_tensor
from planner.schedules import MULTI_STAGE as MULTI_STAGE_SCHEDULES

SINGLE_STAGE = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
MULTI_STAGE = {
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "interleaved_zero_bubble": ScheduleInterleavedZeroBubble,
    "zbv_zero_bubble": ScheduleZBVZeroBubble,
}
"""The torch class of each multi-stage schedule; planner.schedules.MULTI_STAGE names them."""
if MULTI_STAGE.keys() != set(MULTI_STAGE_SCHEDULES):  # the planner's names are the reference
    raise ImportError(
        f"parallel.pipeline.MULTI_STAGE runs {sorted(MULTI_STAGE)}, but the planner emits "
        f"planner.schedules.MULTI_STAGE={sorted(MULTI_STAGE_SCHEDULES)}"
    )


class Pipeline:
    """One schedule over this rank's stage modules; `step` runs all micro-batches."""

    def __init__(
        self,
        modules: list[StageModel],
        schedule: str,
        num_microbatches: int,
        pp_group: dist.ProcessGroup,
        device: torch.device,
        activation_shape: tuple[int, int, int],
        activation_dtype: torch.dtype,
    ) -> None:
        self.modules, self.schedule_name = modules, schedule
        self.num_microbatches, self.pp_group, self.device = num_microbatches, pp_group, device
        self.activation_shape, self.activation_dtype = activation_shape, activation_dtype
        self.has_first = any(m.is_first for m in modules)
        last = [m for m in modules if m.is_last]
        self.last = last[0] if last else None
        self.schedule = self._build_schedule(self._loss)

    def _build_schedule(
        self,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        stage_class: type[PipelineStage] = PipelineStage,
    ) -> PipelineScheduleSingle | PipelineScheduleMulti:
        """Stages (stage_class) over this rank's modules and the torch schedule running them."""
        micro, seq, _ = self.activation_shape
        stages = []
        for module in self.modules:
            # Static shapes: no metadata exchange or inference step (micro, seq/sp, hidden)
            # (requires_grad: the gradients travel back along the same edges)
            hidden = torch.empty(
                self.activation_shape,
                dtype=self.activation_dtype,
                device="meta",
                requires_grad=True,
            )
            if module.is_first:
                example_in = torch.empty((micro, seq), dtype=torch.long, device="meta")
            else:
                example_in = hidden
            example_out = hidden
            stages.append(
                stage_class(
                    module,
                    module.stage,
                    module.num_stages,
                    self.device,
                    input_args=(example_in,),
                    output_args=(example_out,),
                    group=self.pp_group,
                )
            )
        if self.schedule_name in SINGLE_STAGE:
            if len(stages) != 1:
                raise ValueError(f"{self.schedule_name} runs one stage per rank, got {len(stages)}")
            return SINGLE_STAGE[self.schedule_name](stages[0], self.num_microbatches, loss_fn)
        return MULTI_STAGE[self.schedule_name](stages, self.num_microbatches, loss_fn)

    def _loss(self, output: Tensor, targets: Tensor) -> Tensor:
        assert self.last is not None, "the schedule asked a rank without the last stage for a loss"
        return self.last.loss(output, targets)

    def step(self, inputs: Tensor, targets: Tensor) -> Tensor | None:
        """Forward and backward of every micro-batch; the mean micro-batch loss on the rank
        holding the last stage, None elsewhere."""
        args = (inputs,) if self.has_first else ()
        if self.last is None:
            self.schedule.step(*args)
            return None
        losses: list[Tensor] = []
        self.schedule.step(*args, target=targets, losses=losses)
        return torch.stack([loss.detach() for loss in losses]).mean()

    def evaluator(self) -> Callable[[Tensor, Tensor], Tensor | None]:
        """A forward-only pass over micro_batch_size x num_microbatches rows per call:
        run(inputs, targets) -> [summed cross-entropy, tokens] of the real rows on the rank
        holding the last stage (None elsewhere); targets stay on the CPU (padding rows:
        framework.components.evaluation.PAD_TARGET).

        The schedule's own eval(), on stages and a schedule of its own, built per evaluation
        and dropped after it: the training schedule never switches between forward-only and
        training (torch 2.9 did not re-initialise backward after an eval first, pytorch
        #162822), and the eval receive buffers live only while the evaluation runs."""
        schedule = self._build_schedule(self._summed_loss, ForwardOnlyStage)

        def run(inputs: Tensor, targets: Tensor) -> Tensor | None:
            args = (inputs,) if self.has_first else ()
            if self.last is None:
                schedule.eval(*args)
                return None
            sums: list[Tensor] = []
            schedule.eval(*args, target=targets, losses=sums)
            return torch.stack(sums).sum(0)

        return run

    def _summed_loss(self, output: Tensor, targets: Tensor) -> Tensor:
        assert self.last is not None, "the schedule asked a rank without the last stage for a loss"
        return summed_loss(self.last.loss, output, targets)


class ForwardOnlyStage(PipelineStage):
    """A stage of a schedule that runs only eval(): the multi-stage schedules (torch's
    _PipelineScheduleRuntime, 2.13) still walk their backward actions there. Each skips its
    computation without backward, but two do not: handing a V-shaped rank's backward output
    to its adjacent stage (raises: zbv_zero_bubble's eval() fails without this), and
    REDUCE_GRAD (runs FSDP's post-backward on every parameter group by hand). Forward-only,
    there is nothing to hand on or reduce."""

    def get_local_bwd_output(self, mb_index: int) -> tuple[Tensor | None, ...]:
        return ()

    def set_local_bwd_input(
        self, next_stage_bwd_outputs: tuple[Tensor | None, ...], mb_index: int
    ) -> None:
        return None

    def perform_reduce_grad(self, grad_scale_factor: int) -> None:
        return None


class EmbeddingGroup:
    """Sums the gradients of a tied embedding and its last-stage copy (Megatron's embedding
    group): locally when one rank holds both stages (ZBV), else over the two pp ranks."""

    def __init__(
        self,
        mesh: ParallelMesh,
        modules: list[StageModel],
        last_pp_rank: int,
        device: torch.device | None = None,
    ) -> None:
        self.device = device or torch.device(mesh.world.device_type)
        self.params = [
            m.output.weight if m.holds_tied_copy else m.tok_embeddings.weight  # type: ignore[union-attr]
            for m in modules
            if m.holds_tied_copy or (m.is_first and m.cfg.tie_embeddings)
        ]
        self.group = None
        if last_pp_rank != 0:
            # Every rank creates every pair's group, in the same order (new_group is collective).
            # [pp, dp, sp, tp] global ranks as plain ints, read on the real rank tensor
            # (framework/measure/trace.py builds the runtime under a fake mode)
            with unset_fake_temporarily():
                ranks = mesh.world.mesh.reshape(mesh.world.mesh.shape[0], -1).tolist()
            me = dist.get_rank()
            for pair in ([a, b] for a, b in zip(ranks[0], ranks[last_pp_rank], strict=True)):
                group = dist.new_group(pair)
                if me in pair:
                    self.group = group

    @torch.no_grad()
    def __call__(self) -> None:
        grads = [local_tensor(p.grad) for p in self.params if p.grad is not None]
        if len(self.params) == 2:  # both ends on this rank
            total = grads[0] + grads[1]
            for grad in grads:
                grad.copy_(total)
        elif self.params and self.group is not None:
            # offloaded states keep gradient shards in host memory; NCCL reduces device
            # tensors only (gloo: the same tensor, no copy)
            reduced = grads[0].to(self.device)
            dist.all_reduce(reduced, group=self.group)
            if reduced is not grads[0]:
                grads[0].copy_(reduced)
