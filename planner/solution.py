"""What one layout's MILP (planner/milp.py) decides and what a solve returns, as plain data:
the plan assembly (planner/assemble.py) and the search (planner/search.py) read it without
importing PuLP."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

FOUND = ("Optimal Solution Found", "Solution Found")
"""pulp.LpSolution names of a solve that has a solution (optimal, or the best at a limit)."""
CUT_OFF = ("Cut off", "No solution below the cutoff")
"""(status, solution_status) of a layout that cannot beat the cutoff."""
OUT_OF_RANGE = ("Not Solved", "Coefficients out of range")
"""(status, solution_status) of a layout whose rows the solver cannot represent (milp.py's
LARGEST_COEFFICIENT): read as no solution."""


@dataclass(frozen=True)
class Solved:
    """How one solve ended, by name."""

    status: str
    """pulp.LpStatus name."""
    solution: str
    """pulp.LpSolution name."""
    seconds: float
    time_limited: bool

    @property
    def found(self) -> bool:
        return self.solution in FOUND


@dataclass(frozen=True)
class StageChoice:
    """The solution for one pipeline stage: layers per mode and fraction sums per mode."""

    layers: dict[str, int]
    offload_sum: dict[str, float]
    recompute_sum: dict[str, float]
    anchor_offload_sum: dict[str, float]


@dataclass(frozen=True)
class MilpResult:
    """Outcome of one solve; `stages` is empty unless a solution was found."""

    status: str
    """pulp.LpStatus name of the solve."""
    solution_status: str
    """pulp.LpSolution name (optimal, or a feasible solution at the time/gap limit)."""
    objective: float
    seconds: float
    stages: tuple[StageChoice, ...] = field(default_factory=tuple)
    time_limited: bool = False
    """The solve stopped at its time limit (the solution, if any, is not proven optimal)."""

    @property
    def found(self) -> bool:
        return bool(self.stages)


def round_split(fractional: list[float], total: int) -> list[int]:
    """Integers >= 1 summing to total, closest to `fractional` (largest remainders)."""
    floors = [max(1, math.floor(x + 1e-9)) for x in fractional]
    while sum(floors) > total:  # only if the relaxation left stages below one layer
        floors[floors.index(max(floors))] -= 1
    order = sorted(range(len(fractional)), key=lambda i: fractional[i] - floors[i], reverse=True)
    for i in order[: total - sum(floors)]:
        floors[i] += 1
    return floors
