"""kill -9 at random moments, including mid-persist: every resume starts from a complete
commit, and the losses never leave those of an uninterrupted run.

The job is the worker process torchrun starts for one rank (`python -m launch.worker
RUN_DIR`), started in its own session and killed with SIGKILL along with everything in it.
It checkpoints after every step, so a persist is almost always in flight. Kill moments cycle
through: a persist just started (a new .tmp- directory appeared); a random moment up to 1 s
after this job's first new commit (steps, persists, commits, retention); a random moment
after start-up began (imports, resume, the first step).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from framework.components.checkpoint import storage
from framework.trainer import train
from launch.compose import compose_config, dump_resolved
from tests.plans import manual_plan

STEPS = 30
KILLS = 12
OVERRIDES = [
    f"train.steps={STEPS}",
    "train.seq_len=32",
    "train.global_batch_size=4",
    "train.warmup_steps=2",
    "logging.every=1",
    "logging.wandb=false",
    "checkpoint.every=1",
    "checkpoint.keep=2",
]
_STEP_LINE = re.compile(r"^step (\d+) \| loss (\d+\.\d{4}) \|", re.M)
_RESUMED = re.compile(r"^resumed from \S+/step_(\d{9}) at step (\d+)", re.M)


def _start(run_dir: Path, log: Path) -> subprocess.Popen:
    repo = Path(__file__).resolve().parents[2]
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "launch.worker", str(run_dir)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: kill -9 takes every child too
            cwd=repo,
        )


def _kill(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def _tmp_dirs(root: Path) -> set[str]:
    return {p.name for p in root.glob(".tmp-*")} if root.is_dir() else set()


def _reached(moment: int, root: Path, tmp_before: set[str], newest: int | None) -> bool:
    """0: a persist of this job has started; 1: this job has committed a checkpoint."""
    if moment == 0:
        return bool(_tmp_dirs(root) - tmp_before)
    committed = storage.list_committed(root)
    return bool(committed) and committed[0][0] != newest


def _newest_verified(root: Path) -> int | None:
    """Every committed checkpoint is complete (this is the property under test)."""
    committed = storage.list_committed(root)
    for step, directory in committed:
        record = storage.read_commit(directory)
        assert record["step"] == step
        assert storage.verify_files(directory, record, record["files"]) == [], directory
    return committed[0][0] if committed else None


def _check_output(text: str, resumed_step: int | None, reference: dict[int, str]) -> int | None:
    """The run resumed from `resumed_step` (if it got that far) and printed the reference
    losses; returns the last step it printed."""
    steps = [(int(s), loss) for s, loss in _STEP_LINE.findall(text)]
    resumes = _RESUMED.findall(text)
    if resumed_step is None:
        assert not resumes, text[-2000:]
    elif steps or resumes:
        assert resumes == [(f"{resumed_step:09d}", str(resumed_step))], text[-2000:]
    if steps:
        assert steps[0][0] == (resumed_step or 0) + 1, text[-2000:]
    for step, loss in steps:
        assert loss == reference[step], f"step {step}: {loss} != {reference[step]}"
    return steps[-1][0] if steps else None


@pytest.mark.integration
@pytest.mark.slow
def test_kill_9_at_random_moments_never_resumes_from_a_partial_checkpoint(tmp_path):
    cfg = compose_config(OVERRIDES)
    plan = manual_plan(cfg)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "resolved.yaml").write_text(dump_resolved(cfg))
    plan.write(run_dir / "plan.json")
    root = run_dir / "checkpoints"
    uninterrupted = compose_config([*OVERRIDES, "checkpoint.every=0"])
    reference = {
        step: f"{loss:.4f}"
        for step, loss in train(uninterrupted, plan, tmp_path / "reference").losses.items()
    }

    # The kill moments are drawn from this seed: fixed by default so a failure reproduces
    # (MEMPLAN_CRASH_SEED=N explores others); printed so a failing run's output names it.
    seed = int(os.environ.get("MEMPLAN_CRASH_SEED", "20261202"))
    print(f"kill moments from MEMPLAN_CRASH_SEED={seed}")
    rng = random.Random(seed)
    newest, kills, mid_persist = None, 0, 0
    for iteration in range(KILLS):
        log = tmp_path / f"attempt_{iteration}.log"
        before = _tmp_dirs(root)
        process = _start(run_dir, log)
        deadline = time.monotonic() + 120
        moment = iteration % 3
        if moment == 2:  # anywhere from start-up on: imports, resume, the first step
            time.sleep(rng.uniform(0.2, 3.0))
        else:
            while process.poll() is None and not _reached(moment, root, before, newest):
                assert time.monotonic() < deadline, f"moment {moment} not reached in 120 s"
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.02) if moment == 0 else rng.uniform(0.0, 1.0))
        if process.poll() is not None:
            break  # finished before the kill
        _kill(process)
        kills += 1
        mid_persist += bool(_tmp_dirs(root) - before)  # this job's persist, cut short
        _check_output(log.read_text(), newest, reference)
        newest = _newest_verified(root)

    assert kills >= 10, f"only {kills} kills before the run finished (seed {seed})"
    assert mid_persist >= 3, f"only {mid_persist} kills interrupted a persist (seed {seed})"
    log = tmp_path / "final.log"
    process = _start(run_dir, log)
    assert process.wait(timeout=240) == 0, log.read_text()[-3000:]
    last = _check_output(log.read_text(), newest, reference)
    assert last == STEPS, f"seed {seed}"
    assert _newest_verified(root) == STEPS
