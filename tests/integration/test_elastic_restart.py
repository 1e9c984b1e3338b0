"""Elastic restart as a user runs it: `memplan train launch.max_restarts=1` on 2 ranks; one
worker is killed mid-run, torchrun restarts the workers, they resume from the last commit
and the run ends with the same losses as an uninterrupted run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from framework.components.checkpoint import storage
from launch.compose import compose_config
from tests.plans import manual_plan

STEPS = 16
OVERRIDES = [
    f"train.steps={STEPS}",
    "train.seq_len=32",
    "train.global_batch_size=4",
    "train.warmup_steps=2",
    "logging.every=1",
    "logging.wandb=false",
    "cluster.gpus_per_node=2",
    "checkpoint.every=2",
]
_STEP_LINE = re.compile(r"step (\d+) \| loss (\d+\.\d{4}) \| grad_norm (\d+\.\d{4})")
_RESUMED = re.compile(r"resumed from \S+/step_(\d{9}) at step (\d+)")


def _memplan_train(run_dir: Path, plan: Path, *extra: str) -> subprocess.Popen:
    script = Path(sys.executable).parent / "memplan"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "launch.cli"]
    return subprocess.Popen(
        [*command, "train", *OVERRIDES, f"plan.path={plan}", f"launch.run_dir={run_dir}", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _worker_of_rank(root: psutil.Process, rank: int) -> psutil.Process | None:
    for child in root.children(recursive=True):
        try:
            if "launch.worker" in " ".join(child.cmdline()) and child.environ().get("RANK") == str(
                rank
            ):
                return child
        except psutil.NoSuchProcess:
            continue
    return None


def _steps(output: str) -> dict[int, tuple[str, str]]:
    return {int(step): (loss, norm) for step, loss, norm in _STEP_LINE.findall(output)}


@pytest.mark.integration
@pytest.mark.distributed
@pytest.mark.slow
def test_killed_worker_is_restarted_and_the_run_ends_as_if_uninterrupted(tmp_path):
    plan = tmp_path / "plan.json"
    manual_plan(compose_config(OVERRIDES), micro_batch_size=2, dp=2, zero_stage=3).write(plan)

    reference = _memplan_train(tmp_path / "reference", plan)
    out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out[-3000:]
    expected = _steps(out)
    assert sorted(expected) == list(range(1, STEPS + 1))

    run_dir = tmp_path / "elastic"
    job = _memplan_train(run_dir, plan, "launch.max_restarts=1")
    root = run_dir / "checkpoints"
    deadline = time.monotonic() + 240
    while not any(step >= 4 for step, _ in storage.list_committed(root)):
        assert job.poll() is None, "the job ended before its second commit"
        assert time.monotonic() < deadline, "no commit of step 4 within 240 s"
        time.sleep(0.01)
    victim = _worker_of_rank(psutil.Process(job.pid), rank=1)
    assert victim is not None, "no worker process with RANK=1"
    os.kill(victim.pid, signal.SIGKILL)
    killed_after = max(step for step, _ in storage.list_committed(root))
    out, _ = job.communicate(timeout=300)

    assert job.returncode == 0, out[-3000:]
    resumes = [int(step) for _, step in _RESUMED.findall(out)]
    assert len(resumes) == 1, out[-3000:]
    assert resumes[0] >= killed_after, "resumed from an older commit than the newest"
    assert resumes[0] < STEPS, "the kill came after the last step: nothing was restarted"
    assert list((run_dir / "logs").glob("*/attempt_1")), "torchrun did not restart the workers"
    seen = _steps(out)
    assert max(seen) == STEPS
    assert seen[STEPS] == expected[STEPS]  # the final loss and gradient norm, as printed
    assert all(seen[step] == expected[step] for step in seen), (seen, expected)
