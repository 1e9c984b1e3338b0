"""Entry point of every torchrun worker: `python -m launch.worker RUN_DIR`.

Each rank writes its lines to RUN_DIR/logs/rank<R>.log; rank 0 also prints them, except other
libraries' info and warnings (logging.console=memplan, the default: framework/components/logs.py).

Workers load RUN_DIR/resolved.yaml and RUN_DIR/plan.json written by the launcher; they never
run Hydra (so ranks do not race on Hydra output directories).

Bad input found here (the same on every rank) ends the worker with exit code 2 and one line:
in the rank's log, and in $MEMPLAN_ERROR_FILE when `memplan train` started it (the launcher
prints that line instead of torchrun's traceback), else on the console.

torchrun starts each worker in a session of its own, so a signal to the launcher's process
group never reaches it: under torchrun the worker asks the kernel for SIGKILL when torchrun
dies (PR_SET_PDEATHSIG), so a killed launcher or agent never leaves a worker training.

SIGUSR1 (SLURM's --signal before the time limit, from the script `memplan job` writes) stops
training after the step all ranks agree on, with a checkpoint (framework/components/stop.py);
rank 0 then requeues the SLURM job (`scontrol requeue`, when the job's script sets
$MEMPLAN_REQUEUE_ON_SIGNAL=1: job.requeue=true), which resumes from that checkpoint.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from configs.errors import ConfigError
from framework.components.distributed import shutdown_distributed
from framework.components.logs import rank, setup_logging, show_library_lines
from framework.trainer import TrainResult, train
from launch.compose import load_resolved
from launch.train_command import ERROR_FILE_ENV, die_with_parent
from planner.plan import Plan

logger = logging.getLogger(__name__)


def follow_torchrun() -> bool:
    """Under torchrun: die when the agent dies. False when the agent is already gone."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return True  # started by hand: its parent is a shell, which may come and go
    parent = os.getppid()
    die_with_parent(signal.SIGKILL)
    return os.getppid() == parent  # else it died before the request took effect


def report_bad_input(exc: ConfigError) -> None:
    """The one line: to the launcher's error file when there is one (it prints it), else on
    the console; always in this rank's log."""
    line = f"memplan worker: error: {exc}"
    error_file = os.environ.get(ERROR_FILE_ENV)
    if not error_file:
        logger.error(line)
        return
    try:  # the first rank to fail writes it; the others have the same input
        fd = os.open(error_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{exc}\n")
    except FileExistsError:
        pass
    except OSError:
        logger.error(line)  # the launcher cannot get it: the console must
        return
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, line, (), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):  # the rank log, not the console
            handler.handle(record)


def nothing_left(steps: int, start_step: int) -> str | None:
    """The line for a rerun of a finished run (it resumed at or past train.steps)."""
    if start_step < steps:
        return None
    return (
        f"nothing left to do: the checkpoint is at step {start_step} and train.steps={steps};"
        " raise train.steps to train on, or checkpoint.resume=none to start again"
    )


REQUEUE_ENV = "MEMPLAN_REQUEUE_ON_SIGNAL"
"""Set to 1 by the batch script `memplan job` writes (job.requeue=true): a worker stopped by
SIGUSR1 requeues that SLURM job. Unset (`memplan train` inside an salloc, say), it does not."""


def after_stop(result: TrainResult, env: dict[str, str] | None = None) -> str:
    """What a run stopped by a signal does next (rank 0): requeue its SLURM job when the job's
    script asks for it ($MEMPLAN_REQUEUE_ON_SIGNAL=1); the line to log."""
    env = os.environ if env is None else env
    step = result.stopped_at
    saved = (
        f"checkpoint step {result.last_committed} committed"
        if result.last_committed == step
        else f"the checkpoint of step {step} failed (newest: {result.last_committed or 'none'})"
    )
    head = f"stopped by {result.stop_signal} after step {step}; {saved}"
    job_id = env.get("SLURM_JOB_ID")
    if not job_id:
        return f"{head}; run the same command again to resume"
    if env.get(REQUEUE_ENV) != "1":
        return f"{head}; not requeued (job.requeue=false): submit the job again to resume"
    scontrol = shutil.which("scontrol", path=env.get("PATH"))
    if scontrol is None:
        return f"{head}; scontrol not found: submit the job again to resume"
    try:
        done = subprocess.run(
            [scontrol, "requeue", job_id], capture_output=True, text=True, timeout=120, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{head}; scontrol requeue {job_id} failed ({exc}): submit the job again"
    if done.returncode != 0:
        reason = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        return f"{head}; scontrol requeue {job_id} exited with {done.returncode}: {reason}"
    return f"{head}; requeued SLURM job {job_id}: it resumes from there"


def main(argv: list[str]) -> int:
    """Train the run in argv[0]; exit code 2 on bad input (one line, no traceback)."""
    if len(argv) != 1:
        setup_logging()
        logger.error("usage: python -m launch.worker RUN_DIR")
        return 2
    if not follow_torchrun():
        return 1
    run_dir = Path(argv[0])
    setup_logging(run_dir / "logs" / f"rank{rank()}.log")
    try:
        cfg = load_resolved(str(run_dir / "resolved.yaml"))
        if cfg.logging.console == "all":
            show_library_lines()
        plan = Plan.read(run_dir / "plan.json")
        result = train(cfg, plan, run_dir)
    except ConfigError as exc:  # the same input on every rank: every rank stops here
        report_bad_input(exc)
        shutdown_distributed()
        return 2
    done = nothing_left(cfg.train.steps, result.start_step)
    if done and rank() == 0:
        logger.info(done)
    if result.stopped_at is not None and rank() == 0:
        logger.info(after_stop(result))
    # Only after success: a rank that failed must not wait in a collective teardown for
    # peers that may still be inside a collective (torchrun stops them when this one exits).
    shutdown_distributed()
    return 0


if __name__ == "__main__":  # async_save in process mode re-imports the main module
    sys.exit(main(sys.argv[1:]))
