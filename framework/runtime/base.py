"""The seam between the train loop and how the model is laid out over ranks.

The trainer owns the loop, the data, metrics and checkpoint cadence; a TrainRuntime owns one
optimizer step (micro-batches, backward, clipping, the optimizer and LR schedule) and the
state that a checkpoint must hold. Every runtime runs its step through
framework/runtime/step.py, so the phases of a step and their order are written once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.distributed.checkpoint.stateful import Stateful

from framework.components.evaluation import EvalSums, ValidationSet


@dataclass(frozen=True)
class StepOutput:
    """Mean loss over the global batch and the global gradient norm (pre-clipping), as device
    scalars valid on rank 0; reading them is a host sync the trainer does only when logging."""

    loss: Tensor
    grad_norm: Tensor


class TrainRuntime(Protocol):
    """What the trainer needs from a (possibly distributed) model.

    `pre_update_hooks`, empty at construction: train_step calls every hook in it once, right
    before the first write to parameters or optimizer state (before optimizer.step()). The
    checkpointer appends one that waits for a host snapshot still reading that state, so the
    snapshot overlaps the forward and backward.
    """

    device: torch.device
    dp_rank: int
    dp_size: int
    pre_update_hooks: list[Callable[[], None]]

    def train_step(self, inputs: Tensor, targets: Tensor) -> StepOutput:
        """One optimizer step on this data-parallel rank's rows [rows, seq] (int64, CPU)."""
        ...

    def evaluate(self, validation: ValidationSet) -> EvalSums:
        """The loss over every validation window: forward only (framework/runtime/step.py
        forward_only, run_evaluation), this rank's share of the windows in micro-batches of
        the plan's micro_batch_size, sums all-reduced (valid on every rank). Changes no
        parameter, gradient, optimizer, schedule or RNG state."""
        ...

    def stateful_parts(self) -> dict[str, Stateful]:
        """Model, optimizer and LR-schedule state for torch.distributed.checkpoint, keyed by
        parameter name so a checkpoint loads into any layout."""
        ...

    def close(self) -> None:
        """Release resources (process groups stay: the caller owns them)."""
        ...


def autocast_context(device: torch.device, dtype: torch.dtype) -> Any:
    """bf16 autocast on CUDA; a no-op for fp32 (the CPU path is fp32 and exact)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
