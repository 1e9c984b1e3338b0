"""make_plan: the outer search over layouts around the per-layout MILP.

1. Enumerate every executable layout (planner/layouts.py): dp, tp, pp, sp, ZeRO stage,
   micro-batch size, number of micro-batches, pipeline schedule, virtual stages.
2. Cheap bounds per layout, in closed form from the cost coefficients:
   - a memory lower bound (model states averaged over pipeline ranks + the smallest
     transient working set + one layer's activations): above the GPU budget -> pruned;
   - a step-time lower bound (no recompute, no exposed transfer, perfectly balanced stages,
     the schedule's bubble at that balance).
3. Solve the MILPs in order of their time bound; stop when the next bound is no better than
   the best step time found (every remaining layout is provably no faster), or when
   planner.time_limit_seconds runs out.
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
FEASIBILITY_TRIES = 5
"""Layouts a feasibility probe solves at most (lowest memory bound first)."""


@dataclass(frozen=True)
class Candidate:
    """One layout with its cost coefficients and bounds."""

    layout: Layout
    costs: LayoutCosts
    time_bound: float
    memory_bound: float
    gpus_per_node: int

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
    and sum n_i = items (identical items: filling the least-loaded bin first is optimal)."""
    loads = [base + at_least * per_item for base in bases]
    heap = list(loads)
    heapq.heapify(heap)
    for _ in range(items - at_least * len(bases)):
        heapq.heappush(heap, heapq.heappop(heap) + per_item)
    return max(heap)


def bounds(costs: LayoutCosts, num_layers: int) -> tuple[float, float]:
    """(step-time lower bound, per-GPU memory lower bound) of a layout.

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
    residue_base = list(base)
    base[0] += first.forward_seconds + first.backward_seconds + first.zero_exposed_seconds
    base[-1] += last.forward_seconds + last.backward_seconds + last.zero_exposed_seconds
    residue_base[0] = base[0]
    residue_base[-1] = base[-1] - 3 * last.weight_grad_seconds
    total = L * per_layer + sum(base)
    schedule = lay.pp_schedule
    if schedule == "none":
        step = G * total
    else:
        stage_max = _min_max_load(base, per_layer, L, 1)
        if schedule in ("gpipe", "1f1b"):
            step = (G - 1) * stage_max + total
        else:
            rank_base = [0.0] * pp
            for c in range(S):
                rank_base[stage_rank(c, pp, schedule)] += base[c]
            rank_max = _min_max_load(rank_base, per_layer, L, lay.virtual_stages)
            if schedule in ZERO_BUBBLE:
                bubble = (
                    max(0.0, min(residue_base))
                    if residue <= 0
                    else (_min_max_load(residue_base, residue, L, 1))
                )
                step = G * rank_max + (pp - 1) * max(0.0, bubble)
            else:
                step = G * rank_max + (pp - 1) * stage_max
    psi = L * costs.layer_params + first.params + last.params
    tail = (costs.optimizer_seconds_per_param + costs.zero_exposed_end_seconds_per_param) * psi
    states = costs.state_bytes_per_param * psi / pp
    memory = (
        states + costs.workspace_bytes + costs.zero_layer_transient_bytes + costs.full_layer_bytes
    )
    return step + tail / pp, memory


def _candidates(cfg: Config) -> list[Candidate]:
    layouts = enumerate_layouts(cfg.model, cfg.cluster, cfg.train, cfg.planner)
    if not layouts:
        raise explain_no_layout(cfg.model, cfg.cluster, cfg.train, cfg.planner)
    result = []
    for layout in layouts:
        costs = costs_for(cfg, layout)
        time_bound, memory_bound = bounds(costs, cfg.model.num_layers)
        gpn = cfg.cluster.gpus_per_node
        result.append(Candidate(layout, costs, time_bound, memory_bound, gpn))
    return result


@dataclass
class SearchOutcome:
    """What a search found (best may be None) and what it cost."""

    best: Candidate | None
    result: MilpResult | None
    solved: int
    considered: int
    complete: bool
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
    solved, complete, statuses = 0, True, []
    for cand in fits:
        if best_result is not None and cand.time_bound >= best_result.objective * (1 - 1e-9):
            break
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            complete = False
            break
        cutoff = None if best_result is None else best_result.objective
        result = solve_layout(
            cand.costs, cand.stages, cfg.model.num_layers, solver, remaining, gap, cutoff=cutoff
        )
        solved += 1
        statuses.append(result.solution_status)
        if result.status == "Not Solved":  # the time limit ran out inside this solve
            complete = False
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
        statuses,
        time.perf_counter() - started,
    )


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
    optimal = outcome.complete and outcome.result.solution_status == "Optimal Solution Found"
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
