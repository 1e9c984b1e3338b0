"""The training step a measurement times: the runtime's one train-step loop
(framework/runtime/step.py: `run_train_step`, `accumulate_microbatches`) on the stage model
built here (framework/measure/setup.py).

    step = StageStep(model, setup, device)
    step.train_step(*stage_batch(setup, device, seed))   # -> StepOutput

StageStep is framework/runtime/local.py's LocalRuntime (its train_step, clipping, pre-update
hooks, optimizer and LR-schedule update) with the micro-batch forward and backward of one
pipeline stage: a stage that is not the last has no loss (its micro-batch loss is 0) and its
backward starts from the output gradient it was given (what a pipeline stage receives from
the next rank). bf16 weights step with fp32 master weights and moments
(framework/measure/optimizer.py); the LR schedule is the runtime's.
With `ledger=True` each forward runs under framework/measure/saved_bytes.SavedTensorLedger,
which records the saved bytes outside the decoder layers (`saved_outside_bytes`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch
from torch import Tensor

from framework.components.optim import build_lr_scheduler
from framework.measure.optimizer import with_fp32_masters
from framework.measure.saved_bytes import OUTSIDE, SavedTensorLedger
from framework.measure.setup import ProfileSetup
from framework.runtime.local import LocalRuntime
from framework.runtime.step import accumulate_microbatches
from parallel.stage_model import StageModel


class StageStep(LocalRuntime):
    """One optimizer step of a stage model: LocalRuntime's phases and train_step, with a
    stage's forward and backward (see the module doc)."""

    def __init__(
        self,
        model: StageModel,
        setup: ProfileSetup,
        device: torch.device,
        grad_out: Tensor | None = None,
        ledger: bool = False,
    ) -> None:
        # no autocast (dtype fp32): the weights are already in the dtype that runs
        super().__init__(model, setup.train, setup.micro_batch, device, torch.float32)
        self.model: StageModel = model
        if self.optimizer is not (optimizer := with_fp32_masters(self.optimizer)):
            self.optimizer = optimizer  # bf16 weights: framework/measure/optimizer.py
            self.scheduler = build_lr_scheduler(optimizer, setup.train)
        self.pre_update_hooks.append(self._count_grads)
        self.grad_out = grad_out
        """The output gradient a stage that is not the last starts its backward from."""
        if not model.is_last and grad_out is None:
            raise ValueError(f"stage {model.stage} is not the last: it needs grad_out")
        self.ledger = ledger
        self.saved_outside_bytes = 0
        """ledger=True: saved bytes outside the decoder layers in the latest forward."""
        self.grad_bytes = 0
        """Gradient bytes right before the latest update."""
        self._output: Tensor | None = None
        self._num_micro = 1

    # -- the phases of run_train_step that differ from LocalRuntime's ----------------------

    def micro_loss(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """One micro-batch's forward (and loss on the last stage)."""
        model = self.model
        if not model.is_first:  # the previous stage's output requires grad
            inputs = inputs.detach().requires_grad_()
        ledger = SavedTensorLedger(model) if self.ledger else None
        with ledger if ledger is not None else contextlib.nullcontext():
            hidden = model(inputs)
            loss = model.loss(hidden, targets) if model.is_last else None
        if ledger is not None:
            self.saved_outside_bytes = ledger.per_layer_bytes().get(OUTSIDE, 0)
            self.saved_outside_bytes += ledger.shared_bytes()
        if loss is not None:
            return loss
        self._output = hidden
        return torch.zeros((), device=self.device)

    def _backward(self, loss: Tensor, _last_microbatch: bool) -> None:
        """Backward of one micro-batch: from the loss, or from the received output gradient."""
        if self._output is None:
            (loss / self._num_micro).backward()
            return
        output, self._output = self._output, None
        output.backward(self.grad_out)

    def forward_backward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        self._num_micro = inputs.shape[0] // self.micro_batch_size
        return accumulate_microbatches(
            self.micro_loss,
            inputs,
            targets,
            self.micro_batch_size,
            self.device,
            self._backward,
        )

    # --------------------------------------------------------------------------------------

    def _count_grads(self) -> None:
        self.grad_bytes = sum(p.grad.nbytes for p in self.model.parameters() if p.grad is not None)


def stage_batch(
    setup: ProfileSetup, device: torch.device, seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Inputs (token ids, or hidden states on a stage that is not first), targets and an
    output gradient for one micro-batch of the stage, random from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    shape = (setup.micro_batch, setup.seq_local)
    vocab = setup.model.vocab_size
    tokens = torch.randint(0, vocab, shape, generator=generator).to(device)
    targets = torch.randint(0, vocab, shape, generator=generator).to(device)
    hidden = (*shape, setup.model.hidden_size)
    hidden_in = torch.randn(hidden, generator=generator).to(device, setup.dtype)
    grad_out = torch.randn(hidden, generator=generator).to(device, setup.dtype) * 1e-3
    return (tokens if setup.first_stage else hidden_in), targets, grad_out


def sync(device: torch.device) -> None:
    """Wait for the device (a host-device sync point on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds `fn` takes on `device` (synchronised before and after)."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start
