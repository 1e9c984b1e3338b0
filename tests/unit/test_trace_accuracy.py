"""The fast subset of bench/estimator_accuracy.py --trace (issue 12): the planner's peak,
and every phase it predicts, against torch's MemTracker / FSDPMemTracker tracing the plan's
own runtime at real widths under FakeTensorMode: within -1% / +3% (peak) and +-5% (phase).
"""

from __future__ import annotations

import pytest

from framework.measure.trace_accuracy import (
    PEAK_ABOVE,
    PEAK_BELOW,
    PHASE_TOLERANCE,
    TRACE_CASES,
    run_trace_case,
)
from launch.compose import compose_config

FAST = {
    ("1B 4K dp8 (ZeRO-2)", "planner"),
    ("1B 4K CPU fp32, one process", "tokenwise"),
    ("1B 4K fp32 dp2 ZeRO-1", "planner"),
    ("7B 4K dp8 ZeRO-3", "planner"),
    ("8B 3 layers 4K dp8 ZeRO-3", "planner"),
    # fetched on demand: the SwiGLU's tensors only (8B), the layer's end as the peak (7B)
    ("8B 4 layers 32K dp8", "on_demand_mix"),
    ("7B 3 layers 4K dp8 ZeRO-2", "save_on_cpu"),
    # tensor parallel over FSDP2: the MLP norm's backward is the layer's peak at tp4
    ("7B 8K tp4 dp2 ZeRO-2", "planner"),
    ("8B 32K tp2 dp4", "mix"),
}
CASES = [case for case in TRACE_CASES if (case.name, case.policy) in FAST]


@pytest.mark.parametrize("case", CASES, ids=[f"{case.name}:{case.policy}" for case in CASES])
def test_predicted_peak_and_phases_match_the_trace(case, one_torch_thread):
    row = run_trace_case(case, compose_config(list(case.overrides)))
    assert "untraced" not in row, row
    assert -PEAK_BELOW <= row["peak_error"] <= PEAK_ABOVE, row
    assert row["phase_errors"], row  # the phases the planner models were traced
    for phase, error in row["phase_errors"].items():
        assert abs(error) <= PHASE_TOLERANCE, (phase, row)


def test_layouts_the_tracer_cannot_run_are_named():
    case = next(case for case in TRACE_CASES if case.name == "1B 4 layers 4K pp2 ZBV")
    row = run_trace_case(case, compose_config(list(case.overrides)))
    assert "2 stages per rank" in row["untraced"], row
