"""The simple policies a user could configure by hand, evaluated exactly, so that memplan's
plan never loses to one of them (planner/make.py step 4).

    keep        every activation kept on the device (no policy)
    selective   selective recomputation in every layer (h1, h2 and the SwiGLU product)
    full        whole-layer recomputation in every layer (torch.utils.checkpoint per layer)
    offload     every saved tensor of every layer on the host, a layer's host data fetched
                whole when its backward starts and the next layer's meanwhile (MEMO)
    save_on_cpu every saved tensor of every layer on the host, each fetched when autograd
                unpacks it (torch's save_on_cpu; layout.activation_fetch = "on_demand")

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
from planner.costs import LayoutCosts
from planner.plan import LayerPlan, Layout, Plan, SolverInfo

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


def baseline_layers(name: str, layout: Layout, num_layers: int) -> list[LayerPlan]:
    """Every layer with policy `name`, the layers split evenly over the pipeline stages."""
    stages = layout.num_stages
    mode = {"selective": "selective", "full": "full"}.get(name, "none")
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
