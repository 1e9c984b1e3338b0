"""`memplan export` and `memplan plan import=PATH` as a user runs them: the files written load
with DeepSpeed's and accelerate's own parsers, both predicted peaks are printed side by side,
an imported config's peak is memplan's evaluation of the equivalent plan, and bad input is
exit 2 with exactly one line on stderr naming the key (and the file)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from launch.compose import compose_config
from planner.memory import predict_stage_memory
from planner.plan import LayerPlan, Plan
from planner.units import format_bytes
from tests.cli import memplan
from tests.plans import manual_plan
from tests.unit.test_export_configs import read_accelerate, read_deepspeed

pytestmark = pytest.mark.integration

H100 = ["model=llama3_8b", "cluster=h100_8x", "train.seq_len=8192", "train.global_batch_size=64"]


def predicted_peak(overrides: list[str], zero: int, backend: str, micro: int, recompute: str):
    """format_bytes of predict_stage_memory's peak for the plan a config describes."""
    cfg = compose_config(overrides)
    layers = [LayerPlan(i, 0, 0.0, recompute, 0.0) for i in range(cfg.model.num_layers)]
    plan = manual_plan(
        cfg, layers, micro, dp=cfg.cluster.world_size, zero_stage=zero, zero_backend=backend
    )
    plan = dataclasses.replace(plan, train=dataclasses.replace(plan.train, dtype="bf16"))
    return format_bytes(max(rank.peak_bytes for rank in predict_stage_memory(plan, cfg)))


def peaks_row(stdout: str) -> str:
    (row,) = [line for line in stdout.splitlines() if "peak per GPU" in line]
    return row


def test_export_deepspeed_writes_a_json_deepspeed_reads(tmp_path):
    out, plan_out = tmp_path / "ds_config.json", tmp_path / "plan.json"
    done = memplan(
        "export", *H100, "export.format=deepspeed", f"export.out={out}", f"plan.out={plan_out}"
    )
    assert done.returncode == 0, done.stderr
    assert "memplan plan" in done.stdout and "exported (DeepSpeed)" in done.stdout
    assert peaks_row(done.stdout).count("GiB") == 2  # both predicted peaks, side by side
    assert f"wrote {out}" in done.stdout
    ds = read_deepspeed(out, world=8)
    assert ds.train_batch_size == 64
    assert ds.zero_optimization_stage in (0, 1, 2, 3)
    assert ds.bfloat16_config.enabled
    assert Plan.read(plan_out).layout.world_size == 8  # memplan's own plan beside it


@pytest.mark.parametrize("backend, kind", [("fsdp", "FSDP"), ("deepspeed", "DEEPSPEED")])
def test_export_accelerate_writes_a_yaml_accelerate_loads(tmp_path, backend, kind):
    out = tmp_path / "accelerate.yaml"
    done = memplan(
        "export", *H100, "export.format=accelerate",
        f"export.accelerate_backend={backend}", f"export.out={out}",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    loaded = read_accelerate(out)
    assert loaded.distributed_type.value == kind
    assert (loaded.num_machines, loaded.num_processes) == (1, 8)
    if kind == "FSDP":
        assert loaded.fsdp_config["fsdp_version"] == 2 and loaded.mixed_precision == "bf16"
    else:
        beside = tmp_path / "accelerate.deepspeed.json"
        assert loaded.deepspeed_config["deepspeed_config_file"] == str(beside)
        assert read_deepspeed(beside, world=8).train_batch_size == 64


def test_import_of_three_hand_written_configs_is_the_equivalent_plan(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4,
        "zero_optimization": {"stage": 1}, "bf16": {"enabled": True},
    }))  # fmt: skip
    fsdp = tmp_path / "fsdp.yaml"
    fsdp.write_text(yaml.safe_dump({
        "distributed_type": "FSDP", "mixed_precision": "bf16", "num_machines": 1,
        "num_processes": 8, "fsdp_config": {"fsdp_version": 2,
        "fsdp_reshard_after_forward": False, "fsdp_activation_checkpointing": True},
    }))  # fmt: skip
    zero3 = tmp_path / "zero3.json"
    zero3.write_text(json.dumps({
        "train_batch_size": 64, "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3}, "bf16": {"enabled": True},
        "activation_checkpointing": {"partition_activations": False},
    }))  # fmt: skip
    accel = tmp_path / "accel_ds.yaml"
    accel.write_text(yaml.safe_dump({
        "distributed_type": "DEEPSPEED", "num_machines": 1, "num_processes": 8,
        "deepspeed_config": {"deepspeed_config_file": str(zero3), "zero3_init_flag": True},
    }))  # fmt: skip
    cases = [
        (ds, [], (1, "deepspeed", 2, "none")),
        (fsdp, ["train.micro_batch_size=2"], (2, "fsdp2", 2, "full")),
        (accel, [], (3, "deepspeed", 1, "full")),
    ]
    for path, extra, (zero, backend, micro, recompute) in cases:
        done = memplan("plan", f"import={path}", *H100, *extra)
        assert done.returncode == 0, done.stderr
        expected = predicted_peak([*H100, *extra], zero, backend, micro, recompute)
        row = peaks_row(done.stdout)
        assert row.split("│")[2].strip().strip("*") == expected, (path, row)  # theirs first
        assert "memplan plan" in done.stdout and "fits" in done.stdout


@pytest.mark.parametrize(
    "content, words",
    [
        (None, "cannot read"),
        (b"\x00\xff\x00binary", "is not JSON or YAML"),
        (b"key: [unclosed\n", "is not JSON or YAML"),
        (b'{"zero_optimization": {"stage": 5}, "train_batch_size": 8}', "stage=5"),
        (
            b'{"train_batch_size": 7, "train_micro_batch_size_per_gpu": 2, '
            b'"gradient_accumulation_steps": 1}',
            "train_batch_size=7 !=",
        ),
        (b"distributed_type: FSDP\nnum_processes: 3\n", "num_processes=3"),
    ],
)
def test_bad_import_files_exit_2_with_one_line(tmp_path, content, words):
    path = tmp_path / "user_config.json"
    if content is not None:
        path.write_bytes(content)
    done = memplan("plan", f"import={path}", *H100)
    assert done.returncode == 2, done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "plan.import_from" in lines[0] and str(path) in lines[0] and words in lines[0]
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["export.format=hf2", "export.out=x.json"], "export.format"),
        ([], "export.out"),
        (["export.out=x.json", "export.accelerate_backend=megatron"], "export.accelerate_backend"),
    ],
)
def test_bad_export_keys_exit_2_with_one_line(tmp_path, overrides, key):
    done = memplan("export", *overrides, cwd=tmp_path)
    assert done.returncode == 2, done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], done.stderr
