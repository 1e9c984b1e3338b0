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


MANAGED_SBATCH_OPTIONS = {
    "--nodes": "cluster.num_nodes",
    "-N": "cluster.num_nodes",
    "--ntasks-per-node": "the script (one torchrun per node)",
    "--ntasks": "the script (one torchrun per node)",
    "-n": "the script (one torchrun per node)",
    "--chdir": "job.out (the run directory)",
    "-D": "job.out (the run directory)",
    "--output": "job.out (the run directory)",
    "-o": "job.out (the run directory)",
    "--signal": "job.signal_seconds",
    "--time": "job.time",
    "-t": "job.time",
}
"""#SBATCH options the script sets from the plan and the job.* keys: refused in
job.sbatch_extra, with the key that sets each."""


def sbatch_option(entry: str) -> str:
    """The option of a job.sbatch_extra entry without a leading '#SBATCH '."""
    return entry.strip().removeprefix("#SBATCH").strip()


def check_sbatch_option(key: str, entry: str) -> None:
    """One `#SBATCH` option: starts with '-', one line, not one memplan sets."""
    option = sbatch_option(entry)
    if not option.startswith("-") or "\n" in option or "\r" in option:
        raise ConfigError(key, f"{entry!r} is not one #SBATCH option (e.g. --mem=0)")
    name = re.split(r"[=\s]", option, maxsplit=1)[0]
    if len(name) > 2 and not name.startswith("--"):  # -N4 reads as -N
        name = name[:2]
    if name in MANAGED_SBATCH_OPTIONS:
        raise ConfigError(key, f"{name} is set from {MANAGED_SBATCH_OPTIONS[name]}; not here")


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
    exclusive: bool = True
    """SLURM --exclusive: the nodes are this job's alone (no other job shares their GPUs,
    CPUs, host memory or network), as the plan's bandwidths and host RAM assume."""
    signal_seconds: int = 120
    """SLURM --signal=USR1@N: N seconds before the time limit (SLURM may be up to 60 s early)
    the workers get SIGUSR1, save a checkpoint after the step they are in, stop, and requeue
    the job (job.requeue) so that it resumes; 0 sends no signal."""
    sbatch_extra: tuple[str, ...] = ()
    """More `#SBATCH` options, one per entry, each quoted (they hold '='):
    job.sbatch_extra='["--mem=0","--constraint=h100"]' (a leading "#SBATCH " is optional).
    Not the options memplan sets from the plan and the other job.* keys."""
    setup: tuple[str, ...] = ()
    """Shell lines run on each node before torchrun (SLURM: in the batch script, before
    srun), e.g. job.setup='["module load cuda/12.4","source ~/venv/bin/activate"]'."""

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
        check_bounds(self, "job", ("signal_seconds",), at_least=0)
        for i, option in enumerate(self.sbatch_extra):
            check_sbatch_option(f"job.sbatch_extra[{i}]", option)
        for i, line in enumerate(self.setup):
            if "\n" in line or "\r" in line or not line.strip():
                raise ConfigError(f"job.setup[{i}]", f"must be one non-empty line, got {line!r}")
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
