"""Schema of the `profile` node: `memplan profile`."""

from dataclasses import dataclass
from typing import Literal

from configs.errors import ConfigError


@dataclass(frozen=True)
class ProfileConfig:
    """`memplan profile`: predicted vs measured memory on this machine."""

    out: str | None = None
    """Also write the measurements as JSON here."""
    steps: int = 3
    """Training steps to run (the first warms up)."""
    scale: Literal["auto", "full", "small"] = "auto"
    """auto: the plan's per-rank dims on CUDA, a scaled-down model on the CPU; full: the
    plan's dims anywhere; small: scaled down anywhere (policies keep their fractions)."""
    seq_len: int | None = None
    """Local tokens per sequence of a scaled-down run; None: min(128, train.seq_len / sp)."""
    baseline: bool = False
    """Also time the same steps with every activation policy removed (offload overhead)."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError("profile.steps", f"must be >= 1, got {self.steps}")
        if self.seq_len is not None and self.seq_len < 1:
            raise ConfigError("profile.seq_len", f"must be >= 1 or null, got {self.seq_len}")
