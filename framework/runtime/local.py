"""LocalRuntime: one process on one device, the plan's activation policies on its layers.

    build_local_runtime(model_cfg, train_cfg, plan, device, dtype) -> LocalRuntime

A step (framework/runtime/step.py): gradient accumulation over micro-batches -> clip ->
pre-update hooks -> AdamW and LR schedule. Validation (evaluate): the forward alone, under
no_grad, in micro-batches of the plan's size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.stateful import Stateful

from configs.schema import ModelConfig, TrainConfig
from framework.components.evaluation import EvalSums, ValidationSet, summed_loss
from framework.components.loss import chunked_cross_entropy
from framework.components.model import Transformer, build_model
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
from offload import ActivationRuntime, apply_layer_policies, reserve_plan_host_memory
from planner.plan import Plan


class LocalRuntime:
    """One process, one device: gradient accumulation over micro-batches, clip, AdamW. The
    model's layers carry the plan's activation policies (build_local_runtime)."""

    def __init__(
        self,
        model: Transformer,
        train_cfg: TrainConfig,
        micro_batch_size: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.model = model
        self.device = device
        self.dtype = dtype
        self.dp_rank, self.dp_size = 0, 1
        self.micro_batch_size = micro_batch_size
        self.loss_chunk_tokens = train_cfg.loss_chunk_tokens
        self.grad_clip = train_cfg.grad_clip
        self.optimizer = build_optimizer([model], train_cfg, device)
        self.scheduler = build_lr_scheduler(self.optimizer, train_cfg)
        self.pre_update_hooks: list[Callable[[], None]] = []
        self.activation_runtime = ActivationRuntime()
        """The offload/recompute engines of the layers whose policy is not keep-all."""

    def train_step(self, inputs: Tensor, targets: Tensor) -> StepOutput:
        return run_train_step(self, self.pre_update_hooks, inputs, targets)

    # -- the phases of run_train_step ----------------------------------------------------

    def micro_loss(self, tokens: Tensor, targets: Tensor) -> Tensor:
        """One micro-batch's mean loss (forward and loss under autocast)."""
        with autocast_context(self.device, self.dtype):
            hidden = self.model(tokens)
            return chunked_cross_entropy(
                hidden, self.model.output_weight(), targets, self.loss_chunk_tokens
            )

    def forward_backward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        return accumulate_microbatches(
            self.micro_loss, inputs, targets, self.micro_batch_size, self.device
        )

    def finish_gradients(self) -> Tensor:
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        return nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def update(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def global_loss(self, local_loss: Tensor | None) -> Tensor:
        assert local_loss is not None  # one process holds the last (only) stage
        return local_loss

    # --------------------------------------------------------------------------------------

    def evaluate(self, validation: ValidationSet) -> EvalSums:
        batches = validation.batches(0, 1, self.micro_batch_size)
        with forward_only([self.model]):
            return run_evaluation(self.micro_sums, batches, self.device)

    def micro_sums(self, tokens: Tensor, targets: Tensor) -> Tensor:
        """One validation micro-batch: [summed cross-entropy, tokens] of its real rows."""
        with autocast_context(self.device, self.dtype):
            hidden = self.model(tokens.to(self.device, non_blocking=True))
            return summed_loss(self._loss, hidden, targets)

    def _loss(self, hidden: Tensor, targets: Tensor) -> Tensor:
        return chunked_cross_entropy(
            hidden, self.model.output_weight(), targets, self.loss_chunk_tokens
        )

    def stateful_parts(self) -> dict[str, Stateful]:
        return {
            "model": ModelState([self.model]),
            "optimizer": OptimizerState([self.model], [self.optimizer]),
            "lr_scheduler": SchedulerState([self.scheduler]),
        }

    def close(self) -> None:
        """Take the activation policies off the layers (their host slabs go with them)."""
        self.activation_runtime.remove()


def build_local_runtime(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    plan: Plan,
    device: torch.device,
    dtype: torch.dtype,
) -> LocalRuntime:
    """The plan's model on one device: build on meta, materialise, AdamW; every layer keeps,
    offloads and recomputes what plan.layers says, with the host slabs of the offloading
    layers allocated now (micro-batches run one at a time: one slab per layer)."""
    model = build_model(model_cfg).to_empty(device=device)
    initialize_weights(model, model_cfg, train_cfg.seed)
    runtime = LocalRuntime(model, train_cfg, plan.layout.micro_batch_size, device, dtype)
    runtime.activation_runtime = ActivationRuntime(fetch=plan.layout.activation_fetch)
    apply_layer_policies(model.layers.values(), plan.layers, runtime.activation_runtime)
    slabs = {int(layer.layer_index): 1 for layer in model.layers.values()}
    reserve_plan_host_memory(runtime.activation_runtime, device, model_cfg, plan, slabs)
    return runtime
