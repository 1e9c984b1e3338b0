"""`memplan profile` as a user runs it: the per-layer table, the JSON file, exit 2 for a plan
that does not fit."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from launch.compose import compose_config
from planner.plan import LayerPlan
from tests.cli import memplan as run_memplan
from tests.plans import manual_plan

pytestmark = pytest.mark.integration

BASE = ["train.seq_len=64", "train.global_batch_size=4"]
MIXES = [
    (0.3, "none", 0.3, 0.5),
    (0.0, "selective", 0.5, 1.0),
    (0.0, "full", 0.0, 1.0),
    (0.5, "none", 0.0, 0.0),
]


def memplan(*args: str) -> subprocess.CompletedProcess:
    """tests/cli.py's runner with the wider console the profile tables need."""
    return run_memplan(*args, env={**os.environ, "COLUMNS": "200"})


@pytest.fixture(scope="module")
def plan_path(tmp_path_factory) -> Path:
    cfg = compose_config(BASE)
    layers = [
        LayerPlan(i, 0, MIXES[i % 4][0], MIXES[i % 4][1], *MIXES[i % 4][2:])
        for i in range(cfg.model.num_layers)
    ]
    path = tmp_path_factory.mktemp("plans") / "plan.json"
    manual_plan(cfg, layers=layers, micro_batch_size=2).write(path)
    return path


ROW = re.compile(r"^│\s+(\d+) │ (a[\d.]+ r[\d.]+ b[\d.]+(?: \w+)?)\s+│(.*)│$")


def test_table_and_json_report_every_layer(plan_path, tmp_path):
    out = tmp_path / "profile" / "report.json"
    done = memplan("profile", *BASE, f"plan.path={plan_path}", f"profile.out={out}")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("memplan profile: tiny plan (dp=1 tp=1 pp=1 sp=1 zero=0) on cpu")
    assert any("scaled down: hidden 128->64" in line for line in lines)
    rows = [match for line in lines if (match := ROW.match(line))]
    assert [int(row.group(1)) for row in rows] == [0, 1, 2, 3]
    assert rows[1].group(2) == "a0.00 r0.50 b1.00 selective"
    legend = next(line for line in lines if line.startswith("policy: "))
    assert "a = offloaded" in legend and "r = recomputed" in legend and "b = offloaded" in legend
    for row in rows:
        errors = [cell.strip() for cell in row.group(3).split("│")][2::3]
        assert all(error in ("+0.00%", "-") for error in errors), row.group(0)
    peak = next(line for line in lines if line.startswith("peak = measured"))
    assert "(+0.00%)" in peak
    assert any(re.match(r"step time [\d.]+ ms", line) for line in lines)
    assert "host slabs allocated: 4 (0 after step 1)" in lines
    report = json.loads(out.read_text())
    assert [layer["index"] for layer in report["layers"]] == [0, 1, 2, 3]
    for layer in report["layers"]:
        assert layer["measured"]["device_bytes"] == layer["predicted"]["device_bytes"]
        assert layer["measured"]["host_bytes"] == layer["predicted"]["host_bytes"]
    assert report["layers"][2]["policy"]["recompute"] == "full"
    assert report["peak"]["measured_bytes"] == report["peak"]["predicted_bytes"]
    assert len(report["step_seconds"]) == 3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.num_layers=3"], "plan.path: plan has model.num_layers=4 but the model has 3"),
        (["model.hidden_size=96"], "plan has model.hidden_size=128 but the model has 96"),
        (["cluster.gpus_per_node=2"], "plan needs 1 ranks (dp*tp*pp*sp) but the cluster has 2"),
        (["profile.scale=tiny"], "profile.scale: got 'tiny'; allowed: auto, full, small"),
    ],
)
def test_a_plan_that_does_not_fit_is_exit_2_in_one_line(plan_path, overrides, message):
    done = memplan("profile", *BASE, f"plan.path={plan_path}", *overrides)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("memplan profile: error: ")
    assert message in lines[0]
    assert "Traceback" not in done.stderr


def test_unreadable_plan_is_exit_2(tmp_path):
    done = memplan("profile", *BASE, f"plan.path={tmp_path / 'missing.json'}")
    assert done.returncode == 2
    assert "plan.path: cannot read" in done.stderr


# -- profile.mode=trace: the plan's runtime under FakeTensorMode ------------------------------

TRACE_ROW = re.compile(r"^│ (forward layer \d|backward layer \d|loss|optimizer step)")


def test_trace_prints_predicted_vs_traced_per_phase_and_writes_json(tmp_path):
    out = tmp_path / "trace.json"
    done = memplan("profile", "profile.mode=trace", *BASE, f"profile.out={out}")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("memplan profile (trace): tiny plan")
    assert "traced under FakeTensorMode" in lines[0]
    phases = [match.group(1) for line in lines if (match := TRACE_ROW.match(line))]
    for name in ("forward layer 0", "backward layer 3", "loss", "optimizer step"):
        assert name in phases
    summary = next(line for line in lines if line.startswith("rank 0: predicted peak"))
    assert "traced peak" in summary and " in " in summary
    report = json.loads(out.read_text())
    assert report["traced"] is True
    assert report["predicted_peak_bytes"] > 0 and report["traced_peak_bytes"] > 0
    assert report["peak_phase"] in [phase["name"] for phase in report["phases"]]


def test_trace_of_fsdp2_on_two_fake_ranks(tmp_path):
    cfg = compose_config([*BASE, "cluster.gpus_per_node=2"])
    path = tmp_path / "zero3.json"
    manual_plan(cfg, micro_batch_size=1, dp=2, zero_stage=3).write(path)
    done = memplan(
        "profile", "profile.mode=trace", *BASE, "cluster.gpus_per_node=2", f"plan.path={path}"
    )
    assert done.returncode == 0, done.stderr
    assert "ParallelRuntime with FSDPMemTracker, rank 0 of 2" in done.stdout
    assert re.search(r"rank 0: predicted peak .* traced peak [\d.]+ [KMG]iB", done.stdout)


def test_trace_of_an_interleaved_pipeline_plan_says_it_is_not_traced_in_one_line(tmp_path):
    cfg = compose_config([*BASE, "cluster.gpus_per_node=2"])
    path = tmp_path / "pp.json"
    plan = manual_plan(
        cfg, micro_batch_size=1, pp=2, virtual_stages=2, pp_schedule="interleaved_1f1b"
    )
    plan.write(path)
    out = tmp_path / "pp_trace.json"
    done = memplan(
        "profile",
        "profile.mode=trace",
        *BASE,
        "cluster.gpus_per_node=2",
        f"plan.path={path}",
        f"profile.out={out}",
    )
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0]
    assert first.startswith("memplan profile (trace): pipeline layout with 2 stages per rank")
    assert json.loads(out.read_text())["traced"] is False


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["profile.mode=fake"], "profile.mode: got 'fake'; allowed: run, trace"),
        (["model.num_layers=3"], "plan.path: plan has model.num_layers=4 but the model has 3"),
    ],
)
def test_trace_bad_input_is_exit_2_in_one_line(plan_path, overrides, message):
    done = memplan("profile", "profile.mode=trace", *BASE, f"plan.path={plan_path}", *overrides)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("memplan profile: error: ")
    assert message in lines[0]


def test_a_plan_with_states_in_host_ram_is_not_profiled_here():
    """The tracer and the one-process profile hold host and device in one memory."""
    done = memplan(
        "profile", "model=llama2_13b", "cluster=a800_8x", "cluster.gpus_per_node=1",
        "train.seq_len=4096", "profile.mode=trace",
    )  # fmt: skip
    assert done.returncode == 2, done.stdout[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "layout.state_offload" in lines[0], done.stderr
