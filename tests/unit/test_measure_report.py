"""framework/measure/report.py and tables.py: how measurements are printed and written."""

import dataclasses

import pytest
import torch

from framework.measure.report import (
    LayerRow,
    ProfileReport,
    format_error,
    median_step_seconds,
    relative_error,
)
from framework.measure.setup import ProfileSetup
from framework.measure.tables import format_table, model_line, percent, seq_label
from launch.compose import compose_config
from offload import LayerActivationStats
from planner.activations import LayerActivationBytes
from planner.plan import LayerPlan


def test_format_table_aligns_the_first_column_left_and_the_others_right():
    table = format_table(["case", "bytes", "err"], [["a", 1, "+1.00%"], ["longer", 12345]])
    assert table.splitlines() == [
        "case   | bytes |    err",
        "-------+-------+-------",
        "a      |     1 | +1.00%",
        "longer | 12345 |",  # a short row: its missing cells are empty
    ]


def test_labels_and_errors():
    assert [seq_label(n) for n in (384, 1024, 65536, 1536)] == ["384", "1K", "64K", "1536"]
    assert percent(None) == "-" and percent(0.0123) == "+1.23%" and percent(-0.5) == "-50.00%"
    assert format_error(0, 0) == "-" and format_error(5, 0) == "n/a"
    assert format_error(98, 100) == "-2.00%"
    assert relative_error(150, 100) == pytest.approx(0.5)
    assert median_step_seconds([9.0, 1.0, 3.0, 2.0]) == 2.0  # the first step left out
    assert median_step_seconds([4.0]) == 4.0


def test_profile_report_json_has_the_fields_memplan_profile_writes():
    model = compose_config([]).model
    policy = LayerPlan(0, 0, 0.5, "none", 0.25, 1.0)
    setup = ProfileSetup(
        model=model,
        policies=(policy,),
        plan_indices=(7,),
        stage=1,
        num_stages=2,
        micro_batch=2,
        seq_local=64,
        dtype=torch.bfloat16,
        scaled=True,
        notes=("scaled down",),
    )
    predicted = LayerActivationBytes(device_bytes=100, host_bytes=50, recomputed_bytes=25)
    measured = LayerActivationStats(device_bytes=101, host_bytes=50, recomputed_bytes=25)
    report = ProfileReport(
        setup=setup,
        device="cpu",
        rows=[LayerRow(7, policy, predicted, measured)],
        peak_measured_bytes=1000,
        peak_predicted_bytes=990,
        plan_peak_bytes=5000,
        activation_measured_bytes=400,
        state_measured_bytes=600,
        step_seconds=[0.5, 0.25],
        host_slab_allocations=3,
        host_slab_allocations_after_first_step=0,
    )
    data = report.to_dict()
    assert data["dtype"] == "bfloat16" and data["stage"] == 1 and data["num_stages"] == 2
    assert data["model"] == dataclasses.asdict(model) and data["notes"] == ["scaled down"]
    (layer,) = data["layers"]
    assert layer["index"] == 7 and layer["policy"]["index"] == 7
    assert layer["measured"]["device_bytes"] == 101 and layer["predicted"]["host_bytes"] == 50
    assert data["peak"] == {
        "measured_bytes": 1000,
        "predicted_bytes": 990,
        "plan_gpu_peak_bytes": 5000,
        "activation_measured_bytes": 400,
        "state_measured_bytes": 600,
    }
    assert data["baseline"] == {"step_seconds": [], "peak_bytes": None}
    assert data["host_slab_allocations_after_first_step"] == 0


def test_model_line_names_the_shape():
    model = compose_config(["model.num_layers=2"]).model
    assert model_line(model) == "model tiny: 2 layers, hidden 128, heads 4/2, ffn 352, vocab 256"
