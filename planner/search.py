"""The outer search over layouts around the per-layout MILP (steps 1-3 of planner/make.py).

1. Enumerate every executable layout (planner/layouts.py): dp, tp, pp, sp, ZeRO stage,
   micro-batch size, number of micro-batches, pipeline schedule, virtual stages.
2. Cheap bounds per layout, in closed form from the cost coefficients:
   - a memory lower bound (model states averaged over pipeline ranks + the smallest
     transient working set + one layer's activations): above the GPU budget -> pruned;
   - a host lower bound (model states kept in host RAM and checkpoint staging of a node's
     GPUs): above the host budget -> pruned;
   - a step-time lower bound (no recompute, no exposed transfer, the integer layer split
     that best balances the stages, the schedule's bubble at that split); planner/bounds.py.
3. Solve the MILPs in order of their time bound, each with the best step time so far
   (less the gap) as a cutoff; stop when the next bound is within planner.mip_gap of the best
   step time found (no remaining layout can be faster by more than the gap, the same
   guarantee each MILP solve gives), or when planner.time_limit_seconds runs out.
4. Solves that stopped at planner.solve_time_limit_seconds (not proven) are solved again,
   each round with four times the limit, until every one is proven (optimal, cut off, or
   no longer able to beat the incumbent by the gap) or the search's own time limit runs out:
   the search settles for an unproven plan only when its whole time limit is spent.
A feasibility probe (`probe`) instead solves the layouts most likely to fit (lowest memory
bound first) with a loose gap and stops at the first plan. `minimum_use` solves for the least
GPU or host memory instead of the step time (planner/explain.py uses both).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from configs.schema import Config
from planner.bounds import Bounds, bounds
from planner.costs import LayoutCosts, costs_for
from planner.layouts import enumerate_layouts, explain_no_layout
from planner.milp import solve_layout, solver_name
from planner.plan import Layout
from planner.schedules import StageMap
from planner.solution import MilpResult

log = logging.getLogger(__name__)

MINIMUM_LAYOUTS = 5
"""Layouts (lowest memory bound first) whose minimal-memory MILP minimum_use solves."""
FEASIBILITY_TRIES = 5
"""Layouts a feasibility probe solves at most (lowest memory bound first)."""
FEASIBILITY_GAP = 0.5
"""Relative MILP gap of a feasibility probe: any plan that fits will do."""
RESOLVE_FACTOR = 4.0
"""Each round of re-solving the time-limited layouts multiplies their solve limit by this."""
MINIMUM_SOLVE_SECONDS = 2.0
"""Time limit of one minimal-memory solve (minimum_use)."""


@dataclass(frozen=True)
class Candidate:
    """One layout with its cost coefficients and bounds."""

    layout: Layout
    costs: LayoutCosts
    bounds: Bounds
    gpus_per_node: int

    @staticmethod
    def of(cfg: Config, layout: Layout) -> Candidate:
        """`layout` with its cost coefficients and bounds for cfg."""
        costs = costs_for(cfg, layout)
        found = bounds(costs, cfg.model.num_layers)
        return Candidate(layout, costs, found, cfg.cluster.gpus_per_node)

    def solve(
        self,
        num_layers: int,
        solver: str,
        time_limit: float,
        gap: float,
        cutoff: float | None = None,
        objective: str = "time",
    ) -> MilpResult:
        """The layout's MILP; for the step time with the bounds' pipeline maxima as cuts."""
        found = self.bounds
        floors = (found.stage_max, found.rank_max, found.residue_max)
        return solve_layout(
            self.costs,
            self.stages,
            num_layers,
            solver,
            time_limit,
            gap,
            objective=objective,
            cutoff=cutoff,
            floors=floors if objective == "time" else (0.0, 0.0, 0.0),
        )

    @property
    def time_bound(self) -> float:
        return self.bounds.time

    @property
    def memory_bound(self) -> float:
        return self.bounds.memory

    @property
    def stages(self) -> StageMap:
        """Stage placement and in-flight counts (replays the schedule: only when solving)."""
        return StageMap.of(self.layout, self.gpus_per_node)

    @property
    def order(self) -> tuple:
        lay = self.layout
        return (
            self.time_bound,
            lay.zero_stage,
            lay.pp,
            lay.virtual_stages,
            lay.tp,
            lay.sp,
            -lay.micro_batch_size,
            lay.pp_schedule,
        )


def layout_candidates(cfg: Config) -> list[Candidate]:
    """Every executable layout with its costs and bounds (ConfigError if there is none)."""
    layouts = enumerate_layouts(cfg.model, cfg.cluster, cfg.train, cfg.planner)
    if not layouts:
        raise explain_no_layout(cfg.model, cfg.cluster, cfg.train, cfg.planner)
    return [Candidate.of(cfg, layout) for layout in layouts]


@dataclass
class SearchOutcome:
    """What a search found (best may be None) and what it cost."""

    best: Candidate | None
    result: MilpResult | None
    solved: int
    considered: int
    complete: bool
    """Every layout was solved or pruned before planner.time_limit_seconds ran out."""
    proven: bool
    """Every solve ended optimal (within the gap) or infeasible, none at its time limit."""
    statuses: list[str]
    seconds: float


def search(
    cfg: Config, time_limit: float, gap: float, first_feasible: bool = False
) -> SearchOutcome:
    """Best layout and MILP solution within `time_limit` seconds (module docstring)."""
    started = time.perf_counter()
    deadline = started + time_limit
    solver = solver_name(cfg.planner.solver)
    num_layers = cfg.model.num_layers
    candidates = layout_candidates(cfg)
    fits = [
        c
        for c in candidates
        if c.memory_bound <= c.costs.budget_bytes
        and c.bounds.host_memory <= c.costs.host_budget_bytes
    ]
    if first_feasible:  # a feasibility probe: the layouts most likely to fit first
        fits.sort(key=lambda c: c.memory_bound)
        fits = fits[:FEASIBILITY_TRIES]
    else:
        fits.sort(key=lambda c: c.order)
    best: Candidate | None = None
    best_result: MilpResult | None = None
    solved, complete, statuses = 0, True, []
    queue, pending = fits, []  # pending: solves that stopped at their time limit, in order
    limit = cfg.planner.solve_time_limit_seconds
    while True:
        for i, cand in enumerate(queue):
            # every remaining layout is at best within the gap of the incumbent: done
            target = None if best_result is None else best_result.objective * (1 - gap) - 1e-12
            if target is not None and cand.time_bound >= target:
                break
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                complete = queue is not fits  # every layout was solved once
                pending += queue[i:]
                break
            result = cand.solve(num_layers, solver, min(remaining, limit), gap, cutoff=target)
            solved += 1
            statuses.append(result.solution_status)
            if result.time_limited:
                pending.append(cand)  # not proven: solved again with more time (step 4)
            log.debug(
                "%s: %s %.4g s in %.3f s",
                cand.layout,
                result.solution_status,
                result.objective,
                result.seconds,
            )
            if result.found and (best_result is None or result.objective < best_result.objective):
                best, best_result = cand, result
                if first_feasible:
                    break
        if first_feasible or not pending or time.perf_counter() >= deadline:
            break
        queue, pending = pending, []
        limit *= RESOLVE_FACTOR
    return SearchOutcome(
        best,
        best_result,
        solved,
        len(candidates),
        complete,
        not pending,
        statuses,
        time.perf_counter() - started,
    )


def minimum_use(cfg: Config, objective: str, time_limit: float) -> float | None:
    """Smallest per-GPU peak ("gpu", GPU budget dropped) or host bytes per node ("host",
    host budget dropped) over the MINIMUM_LAYOUTS layouts with the lowest memory bounds.
    None if no such solve found a solution in time."""
    deadline = time.perf_counter() + time_limit
    solver = solver_name(cfg.planner.solver)
    candidates = sorted(layout_candidates(cfg), key=lambda c: c.memory_bound)[:MINIMUM_LAYOUTS]
    best = None
    for cand in candidates:
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            break
        result = cand.solve(
            cfg.model.num_layers,
            solver,
            min(remaining, MINIMUM_SOLVE_SECONDS),
            0.0,
            objective=objective,
        )
        if result.found:
            best = result.objective if best is None else min(best, result.objective)
    return best


def probe(cfg: Config, time_limit: float) -> SearchOutcome:
    """A feasibility probe: the layouts most likely to fit, any plan that fits."""
    return search(cfg, time_limit, FEASIBILITY_GAP, first_feasible=True)
