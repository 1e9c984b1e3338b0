"""What a training run says about itself before step 1 (the line under the trainer's header)
and what the metrics line's `mem` is measured against on each device."""

from __future__ import annotations

import re

import pytest
import torch

from framework.components.metrics import (
    MetricsTracker,
    header_summary,
    host_memory_bytes,
    policy_summary,
)
from launch.compose import compose_config
from planner.plan import LayerPlan
from planner.units import GIB
from tests.plans import manual_plan

_LINE = re.compile(
    r"^step (\d+) \| loss (\d+\.\d{4}) \| grad_norm \d+\.\d{4} \| mem \d+\.\d{2} GiB "
    r"\((\d+\.\d)%\) \| tok/s [\d,]+ \| TFLOP/s \d+\.\d{2} \| MFU \d+\.\d%$"
)


def _tracker(cfg, gpu_memory_gib: float) -> MetricsTracker:
    return MetricsTracker(
        cfg.model, 32, 128, 1, cfg.cluster.peak_tflops, gpu_memory_gib * GIB, torch.device("cpu")
    )


def test_cpu_mem_is_rss_against_host_ram_not_the_emulated_gpu():
    cfg = compose_config([])
    tracker = _tracker(cfg, gpu_memory_gib=0.03)  # a plan for 0.03 GiB "GPUs"
    tracker.step_done()
    metrics = tracker.collect(1, torch.tensor(5.0), torch.tensor(1.0))
    line = metrics.line()
    found = _LINE.match(line)
    assert found, line  # the parseable format is unchanged
    assert metrics.mem_fraction == metrics.mem_gib * GIB / host_memory_bytes()
    assert float(found[3]) < 100.0  # not 1482.5%
    assert "host RAM" in tracker.memory_label and "RSS" in tracker.memory_label


def test_header_summary_names_layout_backend_schedule_policies_and_mem():
    cfg = compose_config([])
    plan = manual_plan(cfg)
    line = header_summary(plan, _tracker(cfg, 8.0))
    assert line.startswith("plan: dp1 tp1 pp1 sp1 | ZeRO-0 (fsdp2) | no pipeline | layers 0-3 keep")
    assert line.endswith("host RAM")

    layers = [
        LayerPlan(0, 0, 0.0, "full", 0.0, 1.0),
        LayerPlan(1, 0, 0.25, "selective", 0.5),
        LayerPlan(2, 1, 0.25, "selective", 0.5),
        LayerPlan(3, 1, 0.0, "none", 0.0),
    ]
    two = compose_config(["cluster.gpus_per_node=2"])
    piped = manual_plan(two, layers=layers, pp=2, micro_batch_size=4)
    assert policy_summary(piped) == "0 full anc 1.00, 1-2 selective off 0.25 rec 0.50, 3 keep"
    assert "| 1f1b |" in header_summary(piped, _tracker(two, 8.0))
    assert policy_summary(piped, max_runs=2) == (
        "4 layers in 3 runs: 1 none 2 selective 1 full; mean off 0.12 rec 0.25 anc 0.25"
    )


def test_time_left_out_of_the_window_is_not_throughput(monkeypatch):
    """An evaluation between steps (MetricsTracker.exclude) does not lower tok/s."""
    import framework.components.metrics as metrics_module

    tracker = _tracker(compose_config([]), gpu_memory_gib=8)
    ticks = [100.0, 110.0]  # the window's start, then every later reading

    def clock() -> float:
        return ticks.pop(0) if len(ticks) > 1 else ticks[0]

    monkeypatch.setattr(metrics_module.time, "perf_counter", clock)
    tracker.start_window()
    tracker.step_done()
    tracker.exclude(5.0)  # 5 of the 10 seconds were an evaluation
    metrics = tracker.collect(1, torch.tensor(5.0), torch.tensor(1.0))
    assert metrics.tokens_per_second == pytest.approx(128 / 5.0)
