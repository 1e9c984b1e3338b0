"""Schema of the `logging` group."""

from dataclasses import dataclass
from typing import Literal

from configs.checks import check_bounds


@dataclass(frozen=True)
class LoggingConfig:
    """The metrics line and experiment tracking."""

    every: int = 10
    """Print the metrics line (and sync to the host) every N steps; the last step always logs."""
    wandb: bool = True
    """Log metrics to Weights & Biases (rank 0)."""
    wandb_mode: Literal["offline", "online"] = "offline"
    """offline never touches the network; runs can be synced later with `wandb sync`."""
    wandb_project: str = "memplan"
    """wandb project name."""
    console: Literal["memplan", "all"] = "memplan"
    """What rank 0 prints: memplan = its own lines and every error; all = also other
    libraries' info and warnings (DeepSpeed's op-builder probes, torch's deprecation
    warnings). The rank logs (RUN_DIR/logs/rank<R>.log) get every line either way."""

    def __post_init__(self) -> None:
        check_bounds(self, "logging", ("every",), at_least=1)
