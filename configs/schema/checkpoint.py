"""Schema of the `checkpoint` group."""

from dataclasses import dataclass
from typing import Literal

from configs.checks import check_bounds
from configs.errors import ConfigError


@dataclass(frozen=True)
class CheckpointConfig:
    """When and where training state is saved, and whether a run resumes."""

    dir: str | None = None
    """Checkpoint directory; None means <run dir>/checkpoints."""
    every: int = 0
    """Save every N optimizer steps (and after the last step); 0 disables checkpointing."""
    keep: int = 2
    """Committed checkpoints to keep; older ones are deleted after a new commit."""
    resume: Literal["auto", "none"] = "auto"
    """auto: continue from the newest committed checkpoint in dir whose checksums match."""
    exit_after: int = 0
    """Stop this job after it has run this many steps, with a checkpoint (Megatron's
    --exit-interval: fit a long run into scheduler time limits; the next job resumes);
    0 runs to train.steps."""
    async_mode: Literal["thread", "sync"] = "thread"
    """thread: copy the state to host memory while the next step runs (blocking only if the
    copy is unfinished at the optimizer step), then write it in a background thread;
    sync: write in the training thread before the next step (blocks for the whole save)."""

    def __post_init__(self) -> None:
        check_bounds(self, "checkpoint", ("every", "exit_after"), at_least=0)
        check_bounds(self, "checkpoint", ("keep",), at_least=1)
        if self.exit_after and not self.every:
            raise ConfigError(
                "checkpoint.exit_after",
                "needs checkpoint.every > 0 (the next job resumes from the last checkpoint)",
            )
        if self.dir is not None and not self.dir.strip():
            raise ConfigError("checkpoint.dir", "must be a path or null, got an empty string")
