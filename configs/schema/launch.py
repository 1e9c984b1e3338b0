"""Schemas of the `job` and `launch` nodes: cluster scripts and local torchrun launch."""

import re
from dataclasses import dataclass
from typing import Literal

from configs.checks import check_bounds
from configs.errors import ConfigError

# SLURM --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
_SLURM_TIME = re.compile(r"^(\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2})$")
# Values that land verbatim on `#SBATCH` lines, which sbatch does not unquote.
_SLURM_WORD = re.compile(r"^[A-Za-z0-9_.,+-]+$")
_HOST = re.compile(r"^[A-Za-z0-9_.:\[\]-]+$")


@dataclass(frozen=True)
class JobConfig:
    """`memplan job`: a cluster batch script, with the run's resolved.yaml and plan.json beside
    it so the job runs what was planned."""

    out: str | None = None
    """Write the script here; resolved.yaml and plan.json go into the same directory, which
    becomes the run directory (logs, checkpoints, wandb). Default: <run dir>/job.sh."""
    submit: bool = False
    """Submit with sbatch after writing (job.scheduler=slurm only)."""
    scheduler: Literal["slurm", "torchrun"] = "slurm"
    """slurm: an sbatch script; torchrun: a per-node script for a cluster without SLURM, and
    the command to run on each node is printed."""
    name: str | None = None
    """SLURM job name; default memplan-<model name>."""
    time: str = "24:00:00"
    """Wall-time limit (SLURM --time: M, M:S, H:M:S, D-H, D-H:M or D-H:M:S)."""
    partition: str | None = None
    """SLURM partition."""
    account: str | None = None
    """SLURM account."""
    cpus_per_task: int = 16
    """CPU cores per node-task (one task per node runs torchrun, which starts the ranks)."""
    port: int = 29500
    """c10d rendezvous port on the head node."""
    requeue: bool = True
    """SLURM --requeue: a preempted or failed-node job goes back to the queue and resumes
    from its newest checkpoint (checkpoint.dir is pinned to an absolute path, resume=auto)."""
    head_addr: str | None = None
    """torchrun scheduler: host name or address of node 0 that every node can reach; unset,
    each node's command reads it from $HEAD_ADDR."""

    def __post_init__(self) -> None:
        check_bounds(self, "job", ("cpus_per_task",), at_least=1)
        check_bounds(self, "job", ("port",), at_least=1, at_most=65535)
        if not _SLURM_TIME.match(self.time):
            raise ConfigError(
                "job.time",
                f"{self.time!r} is not a SLURM time; allowed: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S"
                " (e.g. 24:00:00 or 2-00:00:00)",
            )
        for key in ("name", "partition", "account"):
            value = getattr(self, key)
            if value is not None and not _SLURM_WORD.match(value):
                raise ConfigError(
                    f"job.{key}",
                    f"{value!r} is not allowed; use letters, digits and _ . , + - only",
                )
        if self.head_addr is not None and not _HOST.match(self.head_addr):
            raise ConfigError("job.head_addr", f"{self.head_addr!r} is not a host name or address")
        if self.submit and self.scheduler != "slurm":
            raise ConfigError(
                "job.submit",
                f"true needs job.scheduler=slurm, got {self.scheduler} (torchrun prints the"
                " command to run on each node instead)",
            )


@dataclass(frozen=True)
class LaunchConfig:
    """How `memplan train` starts workers."""

    dry_run: bool = False
    """Print the torchrun command and exit (the run directory is written, so the command
    runs as printed)."""
    run_dir: str | None = None
    """Run directory (resolved.yaml, plan.json, logs); default runs/<model>-<timestamp>."""
    max_restarts: int = 0
    """torchrun --max-restarts: restart all workers this many times after a failure (they
    resume from the newest checkpoint when checkpoint.every > 0 and checkpoint.resume=auto);
    `memplan job` passes it to every node's torchrun."""

    def __post_init__(self) -> None:
        check_bounds(self, "launch", ("max_restarts",), at_least=0)
