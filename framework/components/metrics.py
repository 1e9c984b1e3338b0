"""The metrics line: step | loss | grad_norm | mem GiB (%) | tok/s | TFLOP/s | MFU %.

Throughput is averaged over the steps since the previous log line. Reading the loss and the
gradient norm is a host-device sync point, so it happens only on logging steps.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass

import torch

from configs.schema import ModelConfig
from planner.flops import training_flops_per_token
from planner.units import GIB


@dataclass(frozen=True)
class StepMetrics:
    """One logged step. tokens_per_second is global; tflops and mfu are per device."""

    step: int
    loss: float
    grad_norm: float
    mem_gib: float
    mem_fraction: float
    tokens_per_second: float
    tflops: float
    mfu: float

    def line(self) -> str:
        """The parseable metrics line (starts with `step N | loss X.XXXX | ...`)."""
        return (
            f"step {self.step} | loss {self.loss:.4f} | grad_norm {self.grad_norm:.4f} | "
            f"mem {self.mem_gib:.2f} GiB ({100 * self.mem_fraction:.1f}%) | "
            f"tok/s {self.tokens_per_second:,.0f} | TFLOP/s {self.tflops:.2f} | "
            f"MFU {100 * self.mfu:.1f}%"
        )


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated device memory (CUDA), or this process' peak resident set (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class MetricsTracker:
    """Turns per-step losses into metrics lines at logging steps."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        seq_len: int,
        tokens_per_step: int,
        world_size: int,
        peak_tflops: float,
        memory_capacity_bytes: float,
        device: torch.device,
    ) -> None:
        self.flops_per_token = training_flops_per_token(model_cfg, seq_len)
        self.tokens_per_step = tokens_per_step
        self.world_size = world_size
        self.peak_flops = peak_tflops * 1e12
        self.memory_capacity_bytes = memory_capacity_bytes
        self.device = device
        self.start_window()

    def start_window(self) -> None:
        """Start timing now: the trainer calls it right before the first step, so set-up
        (trackers, checkpoint resume) is not counted in the first line's throughput."""
        self._window_start = time.perf_counter()
        self._window_steps = 0

    def step_done(self) -> None:
        """Count one finished optimizer step in the current throughput window."""
        self._window_steps += 1

    def collect(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> StepMetrics:
        """Metrics for `step` over the window since the last call (syncs with the device)."""
        loss_value, norm_value = float(loss), float(grad_norm)  # host-device sync point
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        tokens_per_second = self._window_steps * self.tokens_per_step / elapsed
        flops_per_device = tokens_per_second * self.flops_per_token / self.world_size
        mem = peak_memory_bytes(self.device)
        self._window_start, self._window_steps = time.perf_counter(), 0
        return StepMetrics(
            step=step,
            loss=loss_value,
            grad_norm=norm_value,
            mem_gib=mem / GIB,
            mem_fraction=mem / self.memory_capacity_bytes,
            tokens_per_second=tokens_per_second,
            tflops=flops_per_device / 1e12,
            mfu=flops_per_device / self.peak_flops,
        )
