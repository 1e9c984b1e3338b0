"""The one train-step loop. Every runtime (local, FSDP2/parallel, DeepSpeed) runs its step
through `run_train_step`, and the measurement tooling runs the runtimes' train_step, so the
phases of an optimizer step and their order exist once:

    forward_backward   every micro-batch: forward, loss, backward (gradients accumulate)
    finish_gradients   cross-rank gradient reduction, global norm, clipping
    pre-update hooks   e.g. a checkpoint snapshot still reading parameters or optimizer state
    update             optimizer, LR schedule, zeroed gradients (and post-update broadcasts)
    global_loss        the mean loss over the global batch, on rank 0

A backend supplies the phases; `accumulate_microbatches` is the micro-batch loop they share.

Validation (`run_evaluation`, under `forward_only`) is the forward alone: per batch of
validation rows the backend's summed loss, one all-reduce and one host sync at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

import torch
from torch import Tensor, nn

from framework.components.evaluation import EvalSums
from framework.runtime.base import StepOutput


class StepPhases(Protocol):
    """The layout-specific parts of one optimizer step (see the module doc)."""

    def forward_backward(self, inputs: Tensor, targets: Tensor) -> Tensor | None:
        """All micro-batches of this rank's rows; this rank's mean loss (None on a pipeline
        rank that holds no last stage)."""
        ...

    def finish_gradients(self) -> Tensor | None:
        """Reduce and clip the accumulated gradients; the pre-clipping global norm, or None
        where the backend knows it only after its update."""
        ...

    def update(self) -> Tensor | None:
        """Optimizer and LR-schedule step, gradients zeroed; the pre-clipping global norm if
        finish_gradients could not give it, else None."""
        ...

    def global_loss(self, local_loss: Tensor | None) -> Tensor:
        """The mean loss over the global batch (valid on rank 0)."""
        ...


def run_train_step(
    phases: StepPhases,
    pre_update_hooks: Sequence[Callable[[], None]],
    inputs: Tensor,
    targets: Tensor,
) -> StepOutput:
    """One optimizer step: the phases of the module doc, in that order."""
    local_loss = phases.forward_backward(inputs, targets)
    grad_norm = phases.finish_gradients()
    for hook in pre_update_hooks:  # e.g. a checkpoint snapshot still reading
        hook()
    late_norm = phases.update()
    if grad_norm is None:
        grad_norm = late_norm
    if grad_norm is None:
        raise RuntimeError(f"{type(phases).__name__} reported no gradient norm")
    return StepOutput(phases.global_loss(local_loss), grad_norm)


def accumulate_microbatches(
    micro_loss: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    micro_batch_size: int,
    device: torch.device,
    backward: Callable[[Tensor, bool], None] | None = None,
) -> Tensor:
    """Gradient accumulation over the micro-batches of `inputs`: the mean of their losses.

    `micro_loss(x, y)` is one micro-batch's mean loss. By default `(loss / n).backward()`, so
    the accumulated gradients are those of the rows' mean; a backend with its own backward
    (DeepSpeed's engine scales by the accumulation steps itself) passes
    `backward(loss, is_last_microbatch)`.
    """
    rows = inputs.shape[0]
    if rows % micro_batch_size:
        raise ValueError(f"{rows} rows are not a multiple of micro_batch_size={micro_batch_size}")
    num_micro = rows // micro_batch_size
    total = torch.zeros((), device=device)
    for index in range(num_micro):
        part = slice(index * micro_batch_size, (index + 1) * micro_batch_size)
        x = inputs[part].to(device, non_blocking=True)
        y = targets[part].to(device, non_blocking=True)
        loss = micro_loss(x, y)
        if backward is None:
            (loss / num_micro).backward()
        else:
            backward(loss, index == num_micro - 1)
        total += loss.detach().float()
    return total / num_micro


@contextmanager
def forward_only(modules: Sequence[nn.Module]) -> Iterator[None]:
    """torch.no_grad with the modules in eval mode; their training flags come back after.

    no_grad, not inference_mode: FSDP's all-gather buffers and DTensors made under
    inference_mode would be inference tensors, unusable by the next training step. Without
    grad mode the offload engines run the plain layer (offload/engine.py): nothing is saved,
    offloaded or recomputed, and no host slab is leased.
    """
    modes = [(module, module.training) for module in modules]
    try:
        for module, _ in modes:
            module.eval()
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.train(training)


def run_evaluation(
    batch_sums: Callable[[Tensor, Tensor], Tensor | None],
    batches: Iterable[tuple[Tensor, Tensor]],
    device: torch.device,
    reduce: Callable[[Tensor], None] | None = None,
) -> EvalSums:
    """Sum `batch_sums(inputs, targets)` ([summed cross-entropy, tokens], or None on a rank
    that computes no loss) over this rank's validation batches, `reduce` the total in place
    over the ranks, and read it once."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for inputs, targets in batches:
        sums = batch_sums(inputs, targets)
        if sums is not None:
            total += sums
    if reduce is not None:
        reduce(total)
    loss_sum, tokens = total.tolist()  # host sync, once per evaluation
    return EvalSums(loss_sum, round(tokens))
