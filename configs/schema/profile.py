"""Schema of the `profile` node: `memplan profile`."""

from dataclasses import dataclass

from configs.errors import ConfigError


@dataclass(frozen=True)
class ProfileConfig:
    """`memplan profile`: predicted vs measured memory on this machine."""

    out: str | None = None
    """Also write the measurements as JSON here."""
    steps: int = 3
    """Training steps to run (the first warms up)."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError("profile.steps", f"must be >= 1, got {self.steps}")
