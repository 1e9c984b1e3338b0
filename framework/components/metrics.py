"""The metrics line: step | loss | grad_norm | mem GiB (%) | tok/s | TFLOP/s | MFU %, and the
run summary printed under the trainer's header (layout, backend, schedule, per-layer policy,
what `mem` measures).

Throughput is averaged over the steps since the previous log line. Reading the loss and the
gradient norm is a host-device sync point, so it happens only on logging steps.

`mem` is what can be measured against a budget it belongs to: on CUDA the peak allocated
device memory against cluster.gpu_memory_gib; on the CPU, which has no device memory, the
process' peak resident set against this host's RAM (not against the emulated GPU size the
plan was made for: a CPU process' RSS holds Python, torch and the data, not a GPU's bytes).
"""

from __future__ import annotations

import itertools
import os
import resource
import time
from dataclasses import dataclass

import torch

from configs.schema import ModelConfig
from planner.describe import layout_summary
from planner.flops import training_flops_per_token
from planner.plan import LayerPlan, Plan
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


def host_memory_bytes() -> int:
    """RAM this process can use: the machine's, or its cgroup's limit when that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/sys/fs/cgroup/memory.max") as limit:  # cgroup v2; "max" = no limit
            text = limit.read().strip()
    except OSError:
        return total
    return min(total, int(text)) if text.isdigit() else total


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
        self.device = device
        if device.type == "cuda":
            self.memory_capacity_bytes = memory_capacity_bytes
            self.memory_label = (
                f"peak allocated on {device.type} of {memory_capacity_bytes / GIB:.3g} GiB"
                " (cluster.gpu_memory_gib)"
            )
        else:  # no device memory: the process' RSS, against the RAM it lives in
            self.memory_capacity_bytes = float(host_memory_bytes())
            self.memory_label = (
                f"peak RSS of this process of {self.memory_capacity_bytes / GIB:.3g} GiB host RAM"
            )
        self.start_window()

    def start_window(self) -> None:
        """Start timing now: the trainer calls it right before the first step, so set-up
        (trackers, checkpoint resume) is not counted in the first line's throughput."""
        self._window_start = time.perf_counter()
        self._window_steps = 0

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` (an evaluation between steps) out of the current window."""
        self._window_start += seconds

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


def _policy(layer: LayerPlan) -> str:
    """One layer's activation policy in words: 'keep', 'full', 'selective off 0.30 rec
    0.20 anc 1.00'."""
    if layer.keeps_everything:
        return "keep"
    if layer.recompute == "full":
        text = "full"
    else:
        parts = [] if layer.recompute == "none" else [layer.recompute]
        if layer.offload_fraction:
            parts.append(f"off {layer.offload_fraction:.2f}")
        if layer.recompute_fraction:
            parts.append(f"rec {layer.recompute_fraction:.2f}")
        text = " ".join(parts)
    if layer.anchor_offload_fraction:
        text = f"{text} anc {layer.anchor_offload_fraction:.2f}".strip()
    return text or "keep"


def policy_summary(plan: Plan, max_runs: int = 4) -> str:
    """Per-layer policies, by run of consecutive equal layers ('0-1 full, 2-3 keep'); past
    `max_runs` runs, counts per mode and the mean fractions."""
    runs = [list(members) for _, members in itertools.groupby(plan.layers, key=_policy)]
    if len(runs) <= max_runs:
        spans = []
        for run in runs:
            first, last = run[0].index, run[-1].index
            span = f"{first}" if first == last else f"{first}-{last}"
            spans.append(f"{span} {_policy(run[0])}")
        return ", ".join(spans)
    n = len(plan.layers)
    modes = {mode: sum(layer.recompute == mode for layer in plan.layers) for mode in
             ("none", "selective", "full")}  # fmt: skip
    counts = " ".join(f"{count} {mode}" for mode, count in modes.items() if count)
    off = sum(layer.offload_fraction for layer in plan.layers) / n
    rec = sum(layer.recompute_fraction for layer in plan.layers) / n
    anc = sum(layer.anchor_offload_fraction for layer in plan.layers) / n
    means = f"mean off {off:.2f} rec {rec:.2f} anc {anc:.2f}"
    return f"{n} layers in {len(runs)} runs: {counts}; {means}"


def header_summary(plan: Plan, metrics: MetricsTracker) -> str:
    """The line under the trainer's header: layout, backend, schedule, per-layer policies
    and what the metrics line's `mem` is measured against."""
    return (
        f"plan: {layout_summary(plan)} | layers {policy_summary(plan)} | "
        f"mem = {metrics.memory_label}"
    )
