"""make_plan: the outer search over layouts around the per-layout MILP.

1. Enumerate every executable layout (planner/layouts.py): dp, tp, pp, sp, ZeRO stage,
   micro-batch size, number of micro-batches, pipeline schedule, virtual stages.
2. Cheap bounds per layout, in closed form from the cost coefficients:
   - a memory lower bound (model states averaged over pipeline ranks + the smallest
     transient working set + one layer's activations): above the GPU budget -> pruned;
   - a step-time lower bound (no recompute, no exposed transfer, perfectly balanced stages,
     the schedule's bubble at that balance).
3. Solve the MILPs in order of their time bound, each with the best step time so far
   (less the gap) as a cutoff; stop when the next bound is within planner.mip_gap of the best
   step time found (no remaining layout can be faster by more than the gap, the same
   guarantee each MILP solve gives), or when planner.time_limit_seconds runs out.
4. Turn the best solution into per-layer policies, evaluate them exactly (planner/memory.py,
   planner/timing.py) and return the Plan. Without any feasible layout, raise NoFeasiblePlan
   naming the binding constraint and the smallest change that makes a plan feasible.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import math
import time
from dataclasses import dataclass

from configs.schema import Config
from planner.costs import GIB, LayoutCosts, costs_for
from planner.errors import NoFeasiblePlan
from planner.layouts import enumerate_layouts, explain_no_layout
from planner.memory import predict_host_bytes_per_node, predict_stage_memory
from planner.milp import MilpResult, StageChoice, solve_layout, solver_name
from planner.params import total_params
from planner.plan import (
    ClusterSummary,
    LayerPlan,
    Layout,
    MemoryBreakdown,
    ModelSummary,
    Plan,
    SolverInfo,
    TimeEstimate,
    TrainSummary,
)
from planner.schedules import ZERO_BUBBLE, StageMap, stage_rank
from planner.timing import predict_step_time

log = logging.getLogger(__name__)

MODE_ORDER = ("full", "selective", "none")
"""Order of a stage's layers by recompute mode in the emitted plan."""
NOISE = 1e-6
"""Fractions below this are solver noise."""
MINIMUM_LAYOUTS = 5
"""Layouts (lowest memory bound first) whose minimal-memory MILP minimum_use solves."""
FEASIBILITY_TRIES = 5
"""Layouts a feasibility probe solves at most (lowest memory bound first)."""


@dataclass(frozen=True)
class Candidate:
    """One layout with its cost coefficients and bounds."""

    layout: Layout
    costs: LayoutCosts
    bounds: Bounds
    gpus_per_node: int

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


def _min_max_load(bases: list[float], per_item: float, items: int, at_least: int) -> float:
    """Smallest possible maximum of base_i + n_i x per_item over bins i with n_i >= at_least
    and sum n_i = items. Identical items: fill every bin up to the water level the items
    could at least reach, then place the rest one by one on the least-loaded bin."""
    loads = [base + at_least * per_item for base in bases]
    spare = items - at_least * len(bases)
    if per_item <= 0 or spare <= 0:
        return max(loads)
    loads.sort()
    total = 0.0
    for k, load in enumerate(loads):  # water level over the k + 1 lowest bins
        total += load
        level = (spare * per_item + total) / (k + 1)
        if k + 1 == len(loads) or level <= loads[k + 1]:
            break
    for i in range(k + 1):
        fill = max(0, math.floor((level - loads[i]) / per_item))
        loads[i] += fill * per_item
        spare -= fill
    heapq.heapify(loads)
    for _ in range(spare):
        heapq.heappush(loads, heapq.heappop(loads) + per_item)
    return max(loads)


@dataclass(frozen=True)
class Bounds:
    """Lower bounds of one layout: step time, per-GPU memory, and the three pipeline maxima
    (slowest stage, busiest rank, largest zero-bubble residue) per micro-batch. The maxima
    are valid cuts for the MILP: policies only ever add time to a stage."""

    time: float
    memory: float
    stage_max: float
    rank_max: float
    residue_max: float


def bounds(costs: LayoutCosts, num_layers: int) -> Bounds:
    """Closed-form lower bounds of a layout.

    Time: every layer without recompute or exposed transfer, and the integer layer split
    that minimises the slowest stage (and the busiest rank) exactly; the schedule's formula
    with those maxima. Memory: model states averaged over pp ranks + one layer's activations
    + the backward working set.
    """
    lay = costs.layout
    S, L, G, pp = lay.num_stages, num_layers, lay.num_microbatches, lay.pp
    first, last = costs.first, costs.last
    none = costs.modes["none"]
    per_layer = costs.forward_seconds + none.backward_seconds + costs.layer_zero_exposed_seconds
    residue = per_layer - 3 * costs.weight_grad_seconds  # zero-bubble F + B - 3W per layer
    base = [costs.p2p_seconds * ((c > 0) + (c < S - 1)) for c in range(S)]
    base[0] += first.forward_seconds + first.backward_seconds + first.zero_exposed_seconds
    base[-1] += last.forward_seconds + last.backward_seconds + last.zero_exposed_seconds
    residue_base = list(base)
    residue_base[-1] -= 3 * last.weight_grad_seconds
    total = L * per_layer + sum(base)
    stage_max = _min_max_load(base, per_layer, L, 1)
    rank_base = [0.0] * pp
    for c in range(S):
        rank_base[stage_rank(c, pp, lay.pp_schedule)] += base[c]
    rank_max = _min_max_load(rank_base, per_layer, L, lay.virtual_stages)
    if residue > 0:
        residue_max = _min_max_load(residue_base, residue, L, 1)
    else:  # each stage holds at most L - S + 1 layers
        residue_max = max(b + residue * (L - S + 1) for b in residue_base)
    residue_max = max(0.0, residue_max)
    schedule = lay.pp_schedule
    if schedule == "none":
        step = G * total
    elif schedule in ("gpipe", "1f1b"):
        step = (G - 1) * stage_max + total
    elif schedule in ZERO_BUBBLE:
        step = G * rank_max + (pp - 1) * residue_max
    else:
        step = G * rank_max + (pp - 1) * stage_max
    psi = L * costs.layer_params + first.params + last.params
    tail = (costs.optimizer_seconds_per_param + costs.zero_exposed_end_seconds_per_param) * psi
    states = costs.state_bytes_per_param * psi / pp
    memory = (
        states + costs.workspace_bytes + costs.zero_layer_transient_bytes + costs.full_layer_bytes
    )
    return Bounds(step + tail / pp, memory, stage_max, rank_max, residue_max)


def _candidates(cfg: Config) -> list[Candidate]:
    layouts = enumerate_layouts(cfg.model, cfg.cluster, cfg.train, cfg.planner)
    if not layouts:
        raise explain_no_layout(cfg.model, cfg.cluster, cfg.train, cfg.planner)
    result = []
    for layout in layouts:
        costs = costs_for(cfg, layout)
        found = bounds(costs, cfg.model.num_layers)
        result.append(Candidate(layout, costs, found, cfg.cluster.gpus_per_node))
    return result


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
    candidates = _candidates(cfg)
    fits = [c for c in candidates if c.memory_bound <= c.costs.budget_bytes]
    if first_feasible:  # a feasibility probe: the layouts most likely to fit first
        fits.sort(key=lambda c: c.memory_bound)
        fits = fits[:FEASIBILITY_TRIES]
    else:
        fits.sort(key=lambda c: c.order)
    best: Candidate | None = None
    best_result: MilpResult | None = None
    solved, complete, proven, statuses = 0, True, True, []
    for cand in fits:
        # every remaining layout is at best within the gap of the incumbent: done
        target = None if best_result is None else best_result.objective * (1 - gap) - 1e-12
        if target is not None and cand.time_bound >= target:
            break
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            complete = False
            break
        solve_limit = min(remaining, cfg.planner.solve_time_limit_seconds)
        result = solve_layout(
            cand.costs,
            cand.stages,
            cfg.model.num_layers,
            solver,
            solve_limit,
            gap,
            cutoff=target,
            floors=(cand.bounds.stage_max, cand.bounds.rank_max, cand.bounds.residue_max),
        )
        solved += 1
        statuses.append(result.solution_status)
        if result.time_limited:
            proven = False  # its time limit ran out (with or without a solution)
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
    return SearchOutcome(
        best,
        best_result,
        solved,
        len(candidates),
        complete,
        proven,
        statuses,
        time.perf_counter() - started,
    )


def minimum_use(cfg: Config, objective: str, time_limit: float) -> float | None:
    """Smallest per-GPU peak ("gpu", GPU budget dropped) or host bytes per node ("host",
    host budget dropped) over the MINIMUM_LAYOUTS layouts with the lowest memory bounds.
    None if no such solve found a solution in time."""
    deadline = time.perf_counter() + time_limit
    solver = solver_name(cfg.planner.solver)
    candidates = sorted(_candidates(cfg), key=lambda c: c.memory_bound)[:MINIMUM_LAYOUTS]
    best = None
    for cand in candidates:
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            break
        result = solve_layout(
            cand.costs,
            cand.stages,
            cfg.model.num_layers,
            solver,
            min(remaining, 2.0),
            0.0,
            objective=objective,
        )
        if result.found:
            best = result.objective if best is None else min(best, result.objective)
    return best


def _snap(fraction_sum: float, layers: int, tokens: int) -> int:
    """Tokens per layer for a group's fraction sum, rounded up (never keeps more on the
    device than the MILP planned)."""
    mean = fraction_sum / layers
    if mean < NOISE:
        return 0
    return min(tokens, math.ceil(mean * tokens - NOISE * tokens))


def layer_policies(choices: tuple[StageChoice, ...], seq_local: int) -> list[LayerPlan]:
    """Per-layer plans from the MILP's per-(stage, mode) groups: every layer of a group gets
    the group's mean fractions, snapped up to whole tokens (planner/activations.token_split
    reproduces the token counts exactly)."""
    layers: list[LayerPlan] = []
    for stage, choice in enumerate(choices):
        for mode in MODE_ORDER:
            count = choice.layers[mode]
            if count <= 0:
                continue
            anchor = _snap(choice.anchor_offload_sum[mode], count, seq_local)
            offload = recompute = 0
            if mode != "full":
                offload = _snap(choice.offload_sum[mode], count, seq_local)
                both = choice.offload_sum[mode] + choice.recompute_sum[mode]
                recompute = max(0, _snap(both, count, seq_local) - offload)
            for _ in range(count):
                layers.append(
                    LayerPlan(
                        index=len(layers),
                        stage=stage,
                        offload_fraction=offload / seq_local,
                        recompute=mode,
                        recompute_fraction=recompute / seq_local,
                        anchor_offload_fraction=anchor / seq_local,
                    )
                )
    return layers


def _summaries(cfg: Config, layout: Layout, dtype: str) -> dict:
    m = cfg.model
    return {
        "model": ModelSummary(
            name=m.name,
            num_params=total_params(m),
            num_layers=m.num_layers,
            hidden_size=m.hidden_size,
            num_heads=m.num_heads,
            num_kv_heads=m.num_kv_heads,
            ffn_size=m.ffn_size,
            vocab_size=m.vocab_size,
        ),
        "train": TrainSummary(
            seq_len=cfg.train.seq_len,
            global_batch_size=cfg.train.global_batch_size,
            micro_batch_size=layout.micro_batch_size,
            dtype=dtype,
        ),
        "cluster": ClusterSummary(
            name=cfg.cluster.name,
            num_nodes=cfg.cluster.num_nodes,
            gpus_per_node=cfg.cluster.gpus_per_node,
            gpu_memory_gib=cfg.cluster.gpu_memory_gib,
        ),
    }


def build_plan(cfg: Config, layout: Layout, layers: list[LayerPlan], solver: SolverInfo) -> Plan:
    """A complete Plan for `layout` and per-layer policies, with predicted memory and time."""
    costs = costs_for(cfg, layout)
    draft = Plan(
        layout=layout,
        layers=tuple(layers),
        memory=MemoryBreakdown(0, 0, 0, 0, 0, 0, 0, 0),
        time=TimeEstimate(0.0, 0.0, 0.0),
        solver=solver,
        **_summaries(cfg, layout, costs.dtype),
    )
    ranks = predict_stage_memory(draft, cfg)
    top = max(ranks, key=lambda r: r.peak_bytes)
    memory = MemoryBreakdown(
        gpu_budget_bytes=costs.budget_bytes,
        gpu_peak_bytes=top.peak_bytes,
        params_bytes=top.params_bytes,
        grads_bytes=top.grads_bytes,
        optimizer_bytes=top.optimizer_bytes,
        activations_bytes=top.activations_bytes,
        other_bytes=top.other_bytes,
        host_bytes_per_node=predict_host_bytes_per_node(draft, cfg, ranks),
        gpu_total_bytes=int(cfg.cluster.gpu_memory_gib * GIB),
        reserved_bytes=costs.reserved_bytes,
        host_budget_bytes_per_node=costs.host_budget_bytes,
    )
    with_memory = dataclasses.replace(draft, memory=memory, ranks=tuple(ranks))
    return dataclasses.replace(with_memory, time=predict_step_time(with_memory, cfg))


def make_plan(cfg: Config) -> Plan:
    """The fastest predicted plan for cfg within its GPU and host memory budgets.

    Raises NoFeasiblePlan (one line: the binding constraint and the smallest change that
    makes a plan feasible) or ConfigError (no executable layout exists at all).
    """
    from planner.explain import explain_infeasible  # only on failure

    planner = cfg.planner
    outcome = search(cfg, planner.time_limit_seconds, planner.mip_gap)
    if outcome.best is None or outcome.result is None:
        raise NoFeasiblePlan(explain_infeasible(cfg, outcome))
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
