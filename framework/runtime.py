"""The seam between the train loop and how the model is laid out over ranks.

The trainer owns the loop, the data, metrics and checkpoint cadence; a TrainRuntime owns one
optimizer step (micro-batches, backward, clipping, the optimizer and LR schedule) and the
state that a checkpoint must hold. `LocalRuntime` is one process on one device; parallel/
provides the layouts of a plan with several ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from configs.schema import ModelConfig, TrainConfig
from framework.loss import chunked_cross_entropy
from framework.model import Transformer, build_model, materialize
from framework.optim import build_lr_scheduler, build_optimizer
from offload import ActivationRuntime, apply_layer_policies, reserve_plan_host_memory
from planner.plan import Plan


@dataclass(frozen=True)
class StepOutput:
    """Mean loss over the global batch and the global gradient norm (pre-clipping), as device
    scalars valid on rank 0; reading them is a host sync the trainer does only when logging."""

    loss: Tensor
    grad_norm: Tensor


class TrainRuntime(Protocol):
    """What the trainer needs from a (possibly distributed) model.

    Optional: `pre_update_hooks: list[Callable[[], None]]`, empty at construction. When a
    runtime has it, train_step calls every hook in it once, right before the first write to
    parameters or optimizer state (before optimizer.step()). The checkpointer appends one
    that waits for a host snapshot still reading that state, so the snapshot overlaps the
    forward and backward. Without it, the trainer waits before calling train_step.
    """

    device: torch.device
    dp_rank: int
    dp_size: int

    def train_step(self, inputs: Tensor, targets: Tensor) -> StepOutput:
        """One optimizer step on this data-parallel rank's rows [rows, seq] (int64, CPU)."""
        ...

    def stateful_parts(self) -> dict[str, Stateful]:
        """Model, optimizer and LR-schedule state for torch.distributed.checkpoint, keyed by
        parameter name so a checkpoint loads into any layout."""
        ...

    def close(self) -> None:
        """Release resources (process groups stay: the caller owns them)."""
        ...


class ModelState(Stateful):
    """A model's parameters keyed by fully qualified name (layout independent)."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules

    def state_dict(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for module in self.modules:
            merged.update(get_model_state_dict(module))
        return merged

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for module in self.modules:
            set_model_state_dict(module, state_dict, options=_non_strict())


class OptimizerState(Stateful):
    """Optimizer state keyed by parameter name (layout independent): the flattened form
    (`state.<fqn>.exp_avg`, `param_groups.<fqn>.lr`) that parallel.state uses too, so one
    process and any parallel layout read and write the same checkpoint keys."""

    def __init__(self, modules: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> None:
        self.modules, self.optimizers = modules, optimizers

    def state_dict(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for module, optimizer in zip(self.modules, self.optimizers, strict=True):
            merged.update(get_optimizer_state_dict(module, optimizer, options=_flat()))
        return merged

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for module, optimizer in zip(self.modules, self.optimizers, strict=True):
            set_optimizer_state_dict(module, optimizer, state_dict, options=_flat())


class SchedulerState(Stateful):
    """LR schedule position (identical on every rank)."""

    def __init__(self, scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
        self.scheduler = scheduler

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self.scheduler.last_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scheduler.last_epoch = int(state_dict["last_epoch"])
        self.scheduler._last_lr = [  # what get_last_lr() reports until the next step
            group["lr"] for group in self.scheduler.optimizer.param_groups
        ]


def _non_strict() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # A pipeline stage holds only some parameters of the full state dict.
    return StateDictOptions(strict=False)


def _flat() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(strict=False, flatten_optimizer_state_dict=True)


def autocast_context(device: torch.device, dtype: torch.dtype) -> Any:
    """bf16 autocast on CUDA; a no-op for fp32 (the CPU path is fp32 and exact)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


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
        num_micro = inputs.shape[0] // self.micro_batch_size
        total = torch.zeros((), device=self.device)
        for index in range(num_micro):
            rows = slice(index * self.micro_batch_size, (index + 1) * self.micro_batch_size)
            x = inputs[rows].to(self.device, non_blocking=True)
            y = targets[rows].to(self.device, non_blocking=True)
            with autocast_context(self.device, self.dtype):
                hidden = self.model(x)
                loss = chunked_cross_entropy(
                    hidden, self.model.output_weight(), y, self.loss_chunk_tokens
                )
            (loss / num_micro).backward()
            total += loss.detach()
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        for hook in self.pre_update_hooks:  # e.g. a checkpoint snapshot still reading
            hook()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return StepOutput(total / num_micro, grad_norm)

    def stateful_parts(self) -> dict[str, Stateful]:
        return {
            "model": ModelState([self.model]),
            "optimizer": OptimizerState([self.model], [self.optimizer]),
            "lr_scheduler": SchedulerState(self.scheduler),
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
    model = materialize(build_model(model_cfg), device, train_cfg.seed)
    runtime = LocalRuntime(model, train_cfg, plan.layout.micro_batch_size, device, dtype)
    apply_layer_policies(model.layers.values(), plan.layers, runtime.activation_runtime)
    slabs = {int(layer.layer_index): 1 for layer in model.layers.values()}
    reserve_plan_host_memory(runtime.activation_runtime, device, model_cfg, plan, slabs)
    return runtime
