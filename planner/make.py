"""make_plan: the planner's entry point, the outer search over layouts around the per-layout
MILP, and the explanation when nothing fits.

1-3. Search the layouts (planner/search.py): enumerate every executable layout, bound each
   in closed form (time and memory; over the GPU budget: pruned), solve their MILPs in
   order of the time bound with the best step time so far as a cutoff, until no remaining
   layout can be faster by more than planner.mip_gap or planner.time_limit_seconds runs out.
4. Turn the best solution into per-layer policies, evaluate them exactly (planner/assemble.py
   with planner/memory.py and planner/timing.py). The simple policies a user could set by
   hand (planner/baselines.py: keep, selective, full, offload everything fetched ahead or,
   as torch's save_on_cpu, on demand) are evaluated the
   same way on every layout whose bounds let them fit and beat that plan; the fastest
   plan that fits is returned, so it never loses to one of them.
5. If time ran out before any solve found a plan (near the memory limit the fastest
   layouts' MILPs can stop at their time limits without a solution), look for any feasible
   plan among the layouts most likely to fit (lowest memory bound first, a loose gap); its
   status says it is not proven optimal. Without any feasible layout, raise NoFeasiblePlan
   naming the binding constraint and the smallest change that makes a plan feasible
   (planner/explain.py).
Time: the search and that probe share planner.time_limit_seconds (the probe gets at least
PROBE_SHARE of it); the explanation of an infeasible config takes at most
explain.EXPLAIN_SECONDS more.
"""

from __future__ import annotations

import logging
import time

from configs.schema import Config
from planner.assemble import build_plan, layer_policies
from planner.baselines import BASELINES, Baseline, baseline_layout, fitting_baselines
from planner.errors import NoFeasiblePlan
from planner.explain import explain_infeasible
from planner.milp import solver_name
from planner.plan import Plan, SolverInfo
from planner.search import Candidate, layout_candidates, probe, search

log = logging.getLogger(__name__)

PROBE_SHARE = 0.25
"""Least share of planner.time_limit_seconds the feasibility probe of step 5 gets."""


def make_plan(cfg: Config, explain: bool = True, single_node: bool = False) -> Plan:
    """The fastest predicted plan for cfg within its GPU and host memory budgets.

    Raises NoFeasiblePlan (one line: the binding constraint and the smallest change that
    makes a plan feasible; explain=False skips that search, for callers that only need to
    know, such as a sweep over sequence lengths; single_node=True: the command runs on this
    node only, so the change suggested is more GPUs on it, never more nodes) or ConfigError
    (no executable layout exists at all).
    """
    planner = cfg.planner
    started = time.perf_counter()
    outcome = search(cfg, planner.time_limit_seconds, planner.mip_gap)
    if outcome.best is None and not (outcome.complete and outcome.proven):
        left = planner.time_limit_seconds - (time.perf_counter() - started)
        found = probe(cfg, max(left, PROBE_SHARE * planner.time_limit_seconds))
        if found.best is not None:  # a plan, not proven the fastest (step 5)
            found.solved += outcome.solved
            found.seconds += outcome.seconds
            found.proven = False
            outcome = found
    optimal = outcome.complete and outcome.proven
    solver = SolverInfo(
        name=solver_name(planner.solver),
        status="optimal" if optimal else "feasible (time limit)",
        solve_seconds=outcome.seconds,
        candidates_evaluated=outcome.solved,
        layouts_considered=outcome.considered,
        mip_gap=planner.mip_gap,
    )
    plan = None
    if outcome.best is not None and outcome.result is not None:
        layers = layer_policies(outcome.result.stages, outcome.best.costs.seq_local)
        plan = build_plan(cfg, outcome.best.layout, layers, solver)
    baseline = _faster_baseline(cfg, plan, solver)
    if baseline is not None:
        log.info("the %s policy on %s beats the MILP's plan", baseline.name, baseline.plan.layout)
        plan = baseline.plan
    if plan is None:
        if not explain:
            raise NoFeasiblePlan("no plan fits the GPU and host memory budgets")
        raise NoFeasiblePlan(explain_infeasible(cfg, outcome, single_node))
    return plan


def _faster_baseline(cfg: Config, plan: Plan | None, solver: SolverInfo) -> Baseline | None:
    """The fastest simple policy that fits and beats `plan` (step 4; planner/baselines.py),
    over the layouts whose bounds let one fit and beat it, in order of the time bound."""
    best: Baseline | None = None
    beat = plan.time.step_seconds if plan is not None else None  # the time to beat
    for cand in sorted(layout_candidates(cfg), key=lambda c: c.time_bound):
        if beat is not None and cand.time_bound >= beat:
            break  # no later layout can beat it
        names = BASELINES
        if cand.memory_bound > cand.costs.budget_bytes:
            # only fetching on demand can fit (its bound is lower: planner/bounds.py)
            if not cand.costs.offload or not _on_demand_may_fit(cfg, cand):
                continue
            names = ("save_on_cpu",)
        for found in fitting_baselines(cfg, cand.layout, cand.costs, solver, names):
            if beat is None or found.plan.time.step_seconds < beat:
                best, beat = found, found.plan.time.step_seconds
    return best


def _on_demand_may_fit(cfg: Config, cand: Candidate) -> bool:
    """Whether the layout's memory bound, fetching on demand, is within the GPU budget."""
    twin = Candidate.of(cfg, baseline_layout("save_on_cpu", cand.layout))
    return twin.memory_bound <= twin.costs.budget_bytes
