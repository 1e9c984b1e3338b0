"""Schemas of the `job` and `launch` nodes: cluster scripts and local torchrun launch."""

from dataclasses import dataclass
from typing import Literal

from configs.errors import ConfigError


@dataclass(frozen=True)
class JobConfig:
    """`memplan job`: a cluster batch script."""

    out: str | None = None
    """Write the script here (default: <run dir>/job.sh)."""
    submit: bool = False
    """Submit with sbatch after writing."""
    scheduler: Literal["slurm", "torchrun"] = "slurm"
    """slurm: an sbatch script; torchrun: print per-node commands for a cluster without SLURM."""
    time: str = "24:00:00"
    """Wall-time limit (SLURM --time)."""
    partition: str | None = None
    """SLURM partition."""
    account: str | None = None
    """SLURM account."""
    cpus_per_task: int = 16
    """CPU cores per node-task."""
    port: int = 29500
    """Rendezvous port on the head node."""

    def __post_init__(self) -> None:
        if self.cpus_per_task < 1:
            raise ConfigError("job.cpus_per_task", f"must be >= 1, got {self.cpus_per_task}")
        if not 1 <= self.port <= 65535:
            raise ConfigError("job.port", f"must be in [1, 65535], got {self.port}")


@dataclass(frozen=True)
class LaunchConfig:
    """How `memplan train` starts workers."""

    dry_run: bool = False
    """Print the torchrun command and exit."""
    run_dir: str | None = None
    """Run directory (resolved.yaml, plan.json, logs); default runs/<model>-<timestamp>."""
    max_restarts: int = 0
    """torchrun --max-restarts: restart workers this many times after a failure."""

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ConfigError("launch.max_restarts", f"must be >= 0, got {self.max_restarts}")
