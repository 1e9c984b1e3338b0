"""The plan never loses to a simple policy it could have chosen (issue 12): over a grid of
GPU budgets, every hand-set policy (keep everything, selective or full recomputation in
every layer, every saved tensor on the host, fetched one layer ahead or, as torch's
save_on_cpu, when autograd unpacks it) on every layout, evaluated by the same
evaluator as the plan, is either over a budget or no faster than the plan; and where any of
them fits, the planner finds a plan (so its longest trainable sequence is at least theirs).
"""

from __future__ import annotations

import dataclasses
import time

import pytest

from launch.compose import compose_config
from planner.assemble import build_plan
from planner.baselines import on_demand_use
from planner.costs import costs_for
from planner.errors import NoFeasiblePlan
from planner.explain import _feasible
from planner.layouts import enumerate_layouts
from planner.make import make_plan
from planner.plan import LayerPlan, SolverInfo
from planner.search import probe

SOLVER = SolverInfo("test", "optimal", 0.0, 0, 0, 0.0)


def hand_set(name: str, num_layers: int, stages: int) -> list[LayerPlan]:
    """The user's simple policies, written out here rather than taken from the planner."""
    mode = {"selective": "selective", "full": "full"}.get(name, "none")
    host = 1.0 if name in ("offload", "save_on_cpu") else 0.0
    return [
        LayerPlan(i, i * stages // num_layers, host, mode, 0.0, host) for i in range(num_layers)
    ]


def fitting_hand_set_plans(cfg):
    for layout in enumerate_layouts(cfg.model, cfg.cluster, cfg.train, cfg.planner):
        costs = costs_for(cfg, layout)
        for name in ("keep", "selective", "full", "offload", "save_on_cpu"):
            if (name == "full" and not costs.full_recompute) or (
                name in ("offload", "save_on_cpu") and not costs.offload
            ):
                continue
            layers = hand_set(name, cfg.model.num_layers, layout.num_stages)
            # torch's save_on_cpu brings each tensor back when autograd unpacks it
            fetch = "on_demand" if name == "save_on_cpu" else "prefetch"
            runs_on = dataclasses.replace(layout, activation_fetch=fetch)
            plan = build_plan(cfg, runs_on, layers, SOLVER)
            memory = plan.memory
            if (
                memory.gpu_peak_bytes <= memory.gpu_budget_bytes
                and memory.host_bytes_per_node <= memory.host_budget_bytes_per_node
            ):
                yield name, plan


CASES = {
    "1 GPU, 1B at 16K": ["model=llama3_2_1b", "cluster=h100_1x", "train.seq_len=16384",
                         "train.global_batch_size=1"],
    "8 GPUs, 7B (4 layers) at 32K": ["model=llama2_7b", "model.num_layers=4", "cluster=h100_8x",
                                     "train.seq_len=32768", "train.global_batch_size=8"],
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("gpu_gib", [4, 8, 12, 16, 24, 40])
def test_the_plan_is_never_slower_than_a_simple_policy_that_fits(case, gpu_gib):
    cfg = compose_config([*CASES[case], f"cluster.gpu_memory_gib={gpu_gib}"])
    simple = list(fitting_hand_set_plans(cfg))
    try:
        plan = make_plan(cfg, explain=False)
    except NoFeasiblePlan:
        assert not simple, f"{simple[0][0]} fits on {simple[0][1].layout} but no plan was found"
        return
    assert plan.memory.gpu_peak_bytes <= plan.memory.gpu_budget_bytes
    slack = 1 + cfg.planner.mip_gap
    for name, other in simple:
        assert plan.time.step_seconds <= other.time.step_seconds * slack, (
            name,
            str(other.layout),
            other.time.step_seconds,
            plan.time.step_seconds,
        )


def test_where_only_fetching_on_demand_fits_the_plan_is_save_on_cpus_policy():
    """At 4 GiB per GPU, 4 layers of llama2_7b at 32K fit only with the saved tensors on the
    host fetched when autograd unpacks them (fetching one layer ahead needs a whole layer and
    the next one back at once): the plan fetches on demand, with no more of every tensor on
    the host than fits (fewer copies to wait for), so it is faster than save_on_cpu."""
    cfg = compose_config([*CASES["8 GPUs, 7B (4 layers) at 32K"], "cluster.gpu_memory_gib=4"])
    simple = dict(fitting_hand_set_plans(cfg))
    assert set(simple) == {"save_on_cpu"}
    plan = make_plan(cfg, explain=False)
    assert plan.layout.activation_fetch == "on_demand"
    shares = {layer.offload_fraction for layer in plan.layers}
    assert len(shares) == 1 and 0.5 < shares.pop() < 1.0
    assert plan.memory.gpu_peak_bytes <= plan.memory.gpu_budget_bytes
    assert plan.time.step_seconds < simple["save_on_cpu"].time.step_seconds


def test_the_explainer_knows_what_fetching_on_demand_fits():
    """The MILP models prefetching only; the explainer's feasibility checks and its "needs
    X GiB" also evaluate save_on_cpu's policy fetched on demand (planner/baselines.py)."""
    cfg = compose_config([*CASES["8 GPUs, 7B (4 layers) at 32K"], "cluster.gpu_memory_gib=4"])
    assert probe(cfg, 5.0).best is None  # no prefetching plan fits
    least, fits = on_demand_use(cfg)
    assert fits and least <= compose_budget(cfg)
    assert _feasible(cfg, time.perf_counter() + 10.0)


def compose_budget(cfg) -> int:
    layout = enumerate_layouts(cfg.model, cfg.cluster, cfg.train, cfg.planner)[0]
    return costs_for(cfg, layout).budget_bytes
