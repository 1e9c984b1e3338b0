"""Schema of the `checkpoint` group."""

from dataclasses import dataclass
from typing import Literal

from configs.errors import ConfigError


@dataclass(frozen=True)
class CheckpointConfig:
    """When and where training state is saved, and whether a run resumes."""

    dir: str | None = None
    """Checkpoint directory; None means <run dir>/checkpoints."""
    every: int = 0
    """Save every N optimizer steps; 0 disables checkpointing."""
    keep: int = 2
    """Committed checkpoints to keep; older ones are deleted after a new commit."""
    resume: Literal["auto", "none"] = "auto"
    """auto: continue from the newest committed checkpoint in dir, if any."""

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ConfigError("checkpoint.every", f"must be >= 0, got {self.every}")
        if self.keep < 1:
            raise ConfigError("checkpoint.keep", f"must be >= 1, got {self.keep}")
