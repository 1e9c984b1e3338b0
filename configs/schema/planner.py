"""Schema of the `planner` group: how the MILP searches and what the cost model assumes."""

from dataclasses import dataclass
from typing import Literal

from configs.errors import ConfigError


@dataclass(frozen=True)
class PlannerConfig:
    """Solver limits and cost-model constants."""

    solver: Literal["auto", "highs", "cbc"] = "auto"
    """MILP solver: auto = HiGHS when highspy is installed, CBC otherwise."""
    time_limit_seconds: float = 10.0
    """Wall-time bound of the whole plan search."""
    mip_gap: float = 0.01
    """Relative optimality gap at which a solve stops."""

    def __post_init__(self) -> None:
        if self.time_limit_seconds <= 0:
            raise ConfigError(
                "planner.time_limit_seconds", f"must be > 0, got {self.time_limit_seconds}"
            )
        if not 0.0 <= self.mip_gap < 1.0:
            raise ConfigError("planner.mip_gap", f"must be in [0, 1), got {self.mip_gap}")
