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
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)

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
        micro, seq, _ = activation_shape
        stages = []
        for module in modules:
            # Static shapes: no metadata exchange or inference step (micro, seq/sp, hidden)
            # (requires_grad: the gradients travel back along the same edges)
            hidden = torch.empty(
                activation_shape, dtype=activation_dtype, device="meta", requires_grad=True
            )
            if module.is_first:
                example_in = torch.empty((micro, seq), dtype=torch.long, device="meta")
            else:
                example_in = hidden
            example_out = hidden
            stages.append(
                PipelineStage(
                    module,
                    module.stage,
                    module.num_stages,
                    device,
                    input_args=(example_in,),
                    output_args=(example_out,),
                    group=pp_group,
                )
            )
        self.has_first = any(m.is_first for m in modules)
        last = [m for m in modules if m.is_last]
        self.last = last[0] if last else None
        if schedule in SINGLE_STAGE:
            if len(stages) != 1:
                raise ValueError(f"{schedule} runs one stage per rank, got {len(stages)}")
            self.schedule = SINGLE_STAGE[schedule](stages[0], num_microbatches, self._loss)
        else:
            self.schedule = MULTI_STAGE[schedule](stages, num_microbatches, self._loss)

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


class EmbeddingGroup:
    """Sums the gradients of a tied embedding and its last-stage copy (Megatron's embedding
    group): locally when one rank holds both stages (ZBV), else over the two pp ranks."""

    def __init__(self, mesh: ParallelMesh, modules: list[StageModel], last_pp_rank: int) -> None:
        self.params = [
            m.output.weight if m.holds_tied_copy else m.tok_embeddings.weight  # type: ignore[union-attr]
            for m in modules
            if m.holds_tied_copy or (m.is_first and m.cfg.tie_embeddings)
        ]
        self.group = None
        if last_pp_rank != 0:
            # Every rank creates every pair's group, in the same order (new_group is collective).
            ranks = mesh.world.mesh  # [pp, dp, sp, tp] global ranks
            me = dist.get_rank()
            for index in range(ranks[0].numel()):
                pair = [int(ranks[0].flatten()[index]), int(ranks[last_pp_rank].flatten()[index])]
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
            dist.all_reduce(grads[0], group=self.group)
