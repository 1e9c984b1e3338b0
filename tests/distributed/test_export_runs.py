"""Exported configs run with the targets' own launchers on this machine (CPU, gloo):
- the DeepSpeed JSON `memplan export` writes for a 2-rank plan trains the tiny model with
  plain deepspeed.initialize and gives the same losses as memplan's own DeepSpeed runtime
  on that plan (tests/distributed/export_worker.py);
- the accelerate YAML exported for 2 processes starts `accelerate launch` with a small
  training script: accelerate's FSDP launcher starts 2 processes (torchrun) that see
  WORLD_SIZE=2, ranks 0 and 1, and the FSDP2 settings it names (FSDP_VERSION=2,
  FSDP_RESHARD_AFTER_FORWARD). What accelerate does NOT apply on CPU (PLATFORM.md): without
  CUDA its Accelerator state falls back to DistributedType.NO with one process per rank
  (no process group, no FSDP wrapping), and `--cpu` runs a single plain process; so the
  sharding itself is not exercised here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from launch.compose import dump_resolved
from tests.cli import REPO, memplan
from tests.distributed.layouts import BASE_OVERRIDES, _compose
from tests.plans import manual_plan

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("export_worker.py")
OVERRIDES = [*BASE_OVERRIDES, "cluster.gpus_per_node=2"]


@pytest.mark.parametrize("zero", [1, 2])
def test_exported_deepspeed_config_trains_like_memplans_runtime(tmp_path, zero):
    cfg = _compose(tuple(OVERRIDES))
    plan = manual_plan(cfg, micro_batch_size=2, dp=2, zero_stage=zero, zero_backend="deepspeed")
    plan.write(tmp_path / "plan.json")
    (tmp_path / "resolved.yaml").write_text(dump_resolved(cfg))
    ds = tmp_path / "ds_config.json"
    done = memplan("export", *OVERRIDES, f"plan.path={tmp_path / 'plan.json'}", f"export.out={ds}")
    assert done.returncode == 0, done.stderr
    assert json.loads(ds.read_text())["zero_optimization"]["stage"] == zero
    out = tmp_path / "losses.json"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        str(WORKER), str(tmp_path), str(out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # the worker imports tests.distributed
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert out.exists(), (run.stdout + run.stderr)[-4000:]
    losses = json.loads(out.read_text())
    assert len(losses["memplan"]) == cfg.train.steps
    assert losses["exported"] == pytest.approx(losses["memplan"], rel=1e-6, abs=0)
    assert losses["memplan"][-1] < losses["memplan"][0]  # it trained


SCRIPT = """
import json, os, sys
import torch
from accelerate import Accelerator
accelerator = Accelerator()
state = accelerator.state
model = accelerator.prepare(torch.nn.Linear(4, 4))
print(json.dumps({
    "rank": int(os.environ["RANK"]), "world": int(os.environ["WORLD_SIZE"]),
    "state_processes": state.num_processes, "distributed_type": str(state.distributed_type),
    "fsdp_version": os.environ.get("FSDP_VERSION"),
    "reshard": os.environ.get("FSDP_RESHARD_AFTER_FORWARD"),
    "activation_checkpointing": os.environ.get("FSDP_ACTIVATION_CHECKPOINTING"),
    "wrapped": type(model).__name__,
}), flush=True)
accelerator.wait_for_everyone()
accelerator.end_training()
"""


def printed_objects(stdout: str) -> list[dict]:
    """The JSON objects the processes printed; two ranks writing to one pipe at once can put
    theirs on one line, so each line is decoded object by object."""
    decoder, found = json.JSONDecoder(), []
    for line in stdout.splitlines():
        start = line.find("{")
        while start != -1:
            value, end = decoder.raw_decode(line, start)
            found.append(value)
            start = line.find("{", end)
    return found


def test_exported_accelerate_config_launches_two_processes(tmp_path):
    out = tmp_path / "accelerate.yaml"
    overrides = [*OVERRIDES, "planner.zero_stages=[3]", "planner.zero_backend=fsdp2"]
    done = memplan("export", *overrides, "export.format=accelerate", f"export.out={out}")
    assert done.returncode == 0, done.stderr
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    accelerate = Path(sys.executable).parent / "accelerate"
    # without --cpu: accelerate's FSDP launcher (torchrun); with it, one plain process
    # a free port: the YAML's rendezvous port can be taken by another run on this machine
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [str(accelerate), "launch", "--config_file", str(out), "--main_process_port",
               str(port), str(script)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    seen = printed_objects(run.stdout)
    assert sorted(s["rank"] for s in seen) == [0, 1]
    assert all(s["world"] == 2 for s in seen)
    # the settings the YAML names reach the processes (accelerate's FSDP env variables)
    assert all(s["fsdp_version"] == "2" for s in seen), seen
    assert all(s["reshard"].lower() == "true" for s in seen), seen
