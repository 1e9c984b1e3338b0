"""The simple policies a user could configure by hand, evaluated exactly, so that memplan's
plan never loses to one of them (planner/make.py step 4).

    keep        every activation kept on the device (no policy)
    selective   selective recomputation in every layer (h1, h2 and the SwiGLU product)
    full        whole-layer recomputation in every layer (torch.utils.checkpoint per layer)
    offload     every saved tensor of every layer on the host, a layer's host data fetched
                whole when its backward starts and the next layer's meanwhile (MEMO)
    save_on_cpu every saved tensor of every layer on the host, each fetched when autograd
                unpacks it (torch's save_on_cpu; layout.activation_fetch = "on_demand"),
                and the same with the least share of every tensor's tokens on the host
                that fits (least_on_demand_offload: fewer copies to wait for)

The first four are points of the MILP's search space, but the MILP bounds some instants of
a step (planner/milp.py) where planner/memory.py evaluates them exactly, so near the memory
limit the MILP can refuse a policy that fits. The MILP models prefetching only; fetching on
demand is searched here, as save_on_cpu's policy (the least device memory of any policy
without recomputation, at the price of copies that nothing hides). Here each baseline is
built with the same evaluator as every plan (planner/assemble.py build_plan) on every
layout whose bounds allow it to fit and to beat the plan found, and the fastest one that
fits is returned.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

from configs.schema import Config
from planner.assemble import build_plan
from planner.costs import LayoutCosts, offload_enabled
from planner.plan import LayerPlan, Layout, Plan, SolverInfo
from planner.search import Candidate, layout_candidates

BASELINES = ("keep", "selective", "full", "offload", "save_on_cpu")
"""The simple policies, in the order they are tried."""
OFFLOADING = ("offload", "save_on_cpu")
"""The baselines that put every saved tensor on the host."""


def baseline_layout(name: str, layout: Layout) -> Layout:
    """The layout baseline `name` runs on: save_on_cpu fetches on demand."""
    fetch = "on_demand" if name == "save_on_cpu" else "prefetch"
    return dataclasses.replace(layout, activation_fetch=fetch)


@dataclass(frozen=True)
class Baseline:
    """One simple policy on one layout, evaluated."""

    name: str
    plan: Plan

    @property
    def fits(self) -> bool:
        memory = self.plan.memory
        return (
            memory.gpu_peak_bytes <= memory.gpu_budget_bytes
            and memory.host_bytes_per_node <= memory.host_budget_bytes_per_node
        )


def baseline_layers(
    name: str, layout: Layout, num_layers: int, offload: float | None = None
) -> list[LayerPlan]:
    """Every layer with policy `name`, the layers split evenly over the pipeline stages
    (offload: the share of every saved tensor's tokens on the host, default all of them for
    the offloading baselines)."""
    stages = layout.num_stages
    mode = {"selective": "selective", "full": "full"}.get(name, "none")
    if offload is None:
        offload = 1.0 if name in OFFLOADING else 0.0
    return [
        LayerPlan(
            index=i,
            stage=i * stages // num_layers,
            offload_fraction=offload,
            recompute=mode,  # type: ignore[arg-type]
            recompute_fraction=0.0,
            anchor_offload_fraction=offload,
        )
        for i in range(num_layers)
    ]


def allowed(name: str, costs: LayoutCosts) -> bool:
    """Whether the layout can run baseline `name` (offload needs it enabled, full needs a
    backend that runs whole-layer recomputation)."""
    if name in OFFLOADING:
        return costs.offload
    if name == "full":
        return costs.full_recompute
    return True


def fitting_baselines(
    cfg: Config,
    layout: Layout,
    costs: LayoutCosts,
    solver: SolverInfo,
    names: tuple[str, ...] = BASELINES,
) -> Iterator[Baseline]:
    """Every allowed baseline of `names` on `layout` (fetching as each one does),
    evaluated exactly, that fits its budgets."""
    for name in names:
        if allowed(name, costs):
            layers = baseline_layers(name, layout, cfg.model.num_layers)
            runs_on = baseline_layout(name, layout)
            found = Baseline(name, build_plan(cfg, runs_on, layers, solver))
            if found.fits:
                yield found
                if name == "save_on_cpu":
                    less = least_on_demand_offload(cfg, runs_on, solver)
                    if less is not None:
                        yield less


OFFLOAD_STEPS = 32
"""Resolution of least_on_demand_offload's search over the offloaded share (1/32)."""


def least_on_demand_offload(cfg: Config, layout: Layout, solver: SolverInfo) -> Baseline | None:
    """save_on_cpu's policy with the smallest share of every saved tensor's tokens on the
    host that still fits (a multiple of 1/OFFLOAD_STEPS, found by bisection: a layer's peak
    falls as more of its tokens leave the device), None when only all of them fit. Fetched
    on demand, backward waits for every copy, so the less offloaded the faster."""
    num_layers = cfg.model.num_layers

    def plan_at(step: int) -> Baseline:
        layers = baseline_layers("save_on_cpu", layout, num_layers, step / OFFLOAD_STEPS)
        return Baseline("save_on_cpu (part)", build_plan(cfg, layout, layers, solver))

    low, high, best = 0, OFFLOAD_STEPS, None  # all fits; find the least step that does
    while high - low > 1:
        middle = (low + high) // 2
        found = plan_at(middle)
        if found.fits:
            high, best = middle, found
        else:
            low = middle
    return best


ON_DEMAND_TRIES = 64
"""Layouts (lowest on-demand memory bound first) on_demand_use evaluates at most."""


def on_demand_use(cfg: Config) -> tuple[float | None, bool]:
    """(the least per-GPU peak of save_on_cpu's policy, whether it fits cfg's budgets on some
    layout), evaluating it on the layouts whose memory bounds fetching on demand are lowest
    (at most ON_DEMAND_TRIES, until one fits): what the MILP, which models prefetching only,
    cannot tell planner/explain.py. (None, False) where activation offload is off."""
    if not offload_enabled(cfg.cluster, cfg.planner):
        return None, False
    twins = [
        Candidate.of(cfg, baseline_layout("save_on_cpu", cand.layout))
        for cand in layout_candidates(cfg)
    ]
    twins.sort(key=lambda twin: twin.memory_bound)
    least: float | None = None
    solver = SolverInfo("evaluated", "baseline", 0.0, 0)
    for twin in twins[:ON_DEMAND_TRIES]:
        if least is not None and twin.memory_bound > twin.costs.budget_bytes:
            break  # no later layout can fit; the least peak is among those evaluated
        layers = baseline_layers("save_on_cpu", twin.layout, cfg.model.num_layers)
        found = Baseline("save_on_cpu", build_plan(cfg, twin.layout, layers, solver))
        peak = found.plan.memory.gpu_peak_bytes
        least = peak if least is None else min(least, peak)
        if found.fits:
            return least, True
    return least, False
