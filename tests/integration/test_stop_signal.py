"""SIGUSR1 before a SLURM time limit (`#SBATCH --signal=USR1@N`, from `memplan job`): a CPU
worker that gets it commits a checkpoint after the step it is in, stops, and requeues its
job through scontrol (a stand-in here)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from framework.components.checkpoint.storage import list_committed
from framework.trainer import TrainResult
from launch.worker import REQUEUE_ENV, after_stop
from tests.cli import HANG_SECONDS, REPO, memplan
from tests.integration.test_train_cli import TINY

pytestmark = pytest.mark.integration

SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$STANDIN_LOG"
"""


def _stand_in_scontrol(tmp_path: Path, body: str = SCONTROL) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text(body)
    (bin_dir / "scontrol").chmod(0o755)
    return bin_dir


def test_sigusr1_commits_a_checkpoint_at_that_step_stops_and_requeues(tmp_path):
    run_dir = tmp_path / "run"
    # many steps: the signal comes long before the last; no checkpoint cadence of its own
    overrides = [*TINY, "train.steps=100000", "checkpoint.every=0", f"launch.run_dir={run_dir}"]
    prepared = memplan("train", *overrides, "launch.dry_run=true")  # writes the run directory
    assert prepared.returncode == 0, prepared.stderr
    bin_dir = _stand_in_scontrol(tmp_path)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        REQUEUE_ENV: "1",  # as the batch script sets it (job.requeue=true)
        "STANDIN_LOG": str(tmp_path / "calls.log"),
    }
    worker = subprocess.Popen(  # the worker as torchrun would start it (one rank)
        [sys.executable, "-m", "launch.worker", str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert worker.stdout is not None
    seen = []
    for line in worker.stdout:  # training has started once step 2 is printed
        seen.append(line)
        if line.startswith("step 2 | loss"):
            break
    else:
        pytest.fail("the worker ended before step 2:\n" + "".join(seen))
    worker.send_signal(signal.SIGUSR1)
    rest, _ = worker.communicate(timeout=HANG_SECONDS)
    output = "".join(seen) + rest
    assert worker.returncode == 0, output[-3000:]

    stop_lines = [line for line in output.splitlines() if line.startswith("SIGUSR1: stopping")]
    assert len(stop_lines) == 1, output[-3000:]
    step = int(stop_lines[0].split("after step ")[1].split(",")[0])
    assert 2 <= step < 100000
    committed = list_committed(run_dir / "checkpoints")
    assert [found for found, _ in committed] == [step]  # the one checkpoint: that step's
    assert (
        f"stopped by SIGUSR1 after step {step}; checkpoint step {step} committed; requeued"
        " SLURM job 4242: it resumes from there"
    ) in output
    assert (tmp_path / "calls.log").read_text() == "scontrol requeue 4242\n"
    assert f"step {step + 1} | loss" not in output  # no step after the agreed one
    assert "Traceback" not in output


def _stopped(step: int = 7, committed: int | None = 7) -> TrainResult:
    return TrainResult(stopped_at=step, stop_signal="SIGUSR1", last_committed=committed)


def test_after_a_stop_outside_slurm_or_without_requeue_the_line_says_how_to_resume(tmp_path):
    assert after_stop(_stopped(), env={"PATH": "", REQUEUE_ENV: "1"}) == (
        "stopped by SIGUSR1 after step 7; checkpoint step 7 committed; run the same command"
        " again to resume"
    )
    slurm = {"SLURM_JOB_ID": "9", "PATH": "", REQUEUE_ENV: "1"}
    line = after_stop(_stopped(), env={**slurm, REQUEUE_ENV: "0"})  # or unset: an salloc
    assert line.endswith("not requeued (job.requeue=false): submit the job again to resume")
    line = after_stop(_stopped(committed=5), env=slurm)
    assert "the checkpoint of step 7 failed (newest: 5)" in line
    assert line.endswith("scontrol not found: submit the job again to resume")
    failing = _stand_in_scontrol(tmp_path, "#!/bin/bash\necho 'Invalid job id' >&2\nexit 1\n")
    line = after_stop(_stopped(), env={**slurm, "PATH": str(failing)})
    assert line.endswith("scontrol requeue 9 exited with 1: Invalid job id")


@pytest.mark.distributed
@pytest.mark.slow
def test_a_signal_to_one_rank_stops_both_after_the_same_step(tmp_path):
    """SLURM signals every process, but not at the same instant: the ranks agree on the step
    (here only rank 1 gets it), and the checkpoint of that step is committed by both."""
    import psutil

    run_dir = tmp_path / "run"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "launch.cli", "train", *TINY, "train.steps=100000",
         "cluster.gpus_per_node=2", "checkpoint.every=0", f"launch.run_dir={run_dir}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert launcher.stdout is not None
    seen = []
    for line in launcher.stdout:
        seen.append(line)
        if line.startswith("step 2 | loss"):
            break
    else:
        pytest.fail("the run ended before step 2:\n" + "".join(seen))
    workers = [
        child
        for child in psutil.Process(launcher.pid).children(recursive=True)
        if "launch.worker" in child.cmdline() and child.environ().get("RANK") == "1"
    ]
    assert len(workers) == 1, workers
    workers[0].send_signal(signal.SIGUSR1)
    rest, _ = launcher.communicate(timeout=HANG_SECONDS)
    output = "".join(seen) + rest
    assert launcher.returncode == 0, output[-3000:]
    (stop_line,) = [line for line in output.splitlines() if line.startswith("SIGUSR1: stopping")]
    step = int(stop_line.split("after step ")[1].split(",")[0])
    assert [found for found, _ in list_committed(run_dir / "checkpoints")] == [step]
    assert f"stopped by SIGUSR1 after step {step}; checkpoint step {step} committed" in output
