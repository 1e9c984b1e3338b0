"""make_plan: the planner's entry point, the outer search over layouts around the per-layout
MILP, and the explanation when nothing fits.

1-3. Search the layouts (planner/search.py): enumerate every executable layout, bound each
   in closed form (time and memory; over the GPU budget: pruned), solve their MILPs in
   order of the time bound with the best step time so far as a cutoff, until no remaining
   layout can be faster by more than planner.mip_gap or planner.time_limit_seconds runs out.
4. Turn the best solution into per-layer policies, evaluate them exactly (planner/assemble.py
   with planner/memory.py and planner/timing.py) and return the Plan.
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

import time

from configs.schema import Config
from planner.assemble import build_plan, layer_policies
from planner.errors import NoFeasiblePlan
from planner.explain import explain_infeasible
from planner.milp import solver_name
from planner.plan import Plan, SolverInfo
from planner.search import probe, search

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
    if outcome.best is None or outcome.result is None:
        if not explain:
            raise NoFeasiblePlan("no plan fits the GPU and host memory budgets")
        raise NoFeasiblePlan(explain_infeasible(cfg, outcome, single_node))
    best = outcome.best
    optimal = outcome.complete and outcome.proven
    solver = SolverInfo(
        name=solver_name(planner.solver),
        status="optimal" if optimal else "feasible (time limit)",
        solve_seconds=outcome.seconds,
        candidates_evaluated=outcome.solved,
        layouts_considered=outcome.considered,
        mip_gap=planner.mip_gap,
    )
    layers = layer_policies(outcome.result.stages, best.costs.seq_local)
    return build_plan(cfg, best.layout, layers, solver)
