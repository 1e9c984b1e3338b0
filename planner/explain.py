"""Why no plan fits, and the smallest change that makes one fit (NoFeasiblePlan's message).

The binding constraint is found by solving the MILP of the most promising layouts with the
budget in question dropped and its use minimised instead ("needs X GiB per GPU at best"),
and, for the GPU, by evaluating save_on_cpu's policy fetched on demand, which the MILP does
not model (planner/baselines.py on_demand_use).
The suggested changes are verified by re-running a feasibility search on the changed config:
model states in host RAM (when the search did not consider them), more GPUs (doubling
cluster.num_nodes; for a command that runs on one node only, such as memplan train, doubling
cluster.gpus_per_node up to MAX_GPUS_PER_NODE instead), a shorter sequence (bisection on
train.seq_len) and, when host RAM binds, the host RAM that suffices.
Every probe ends by the explanation's deadline (EXPLAIN_SECONDS).
"""

from __future__ import annotations

import dataclasses
import math
import time

from configs.errors import ConfigError
from configs.schema import Config
from planner.baselines import on_demand_use
from planner.layouts import state_offload_enabled
from planner.search import SearchOutcome, layout_candidates, minimum_use, probe
from planner.units import GIB

PROBE_SECONDS = 2.0
"""Time limit of one feasibility probe."""
EXPLAIN_SECONDS = 8.0
"""Total time spent looking for suggestions."""
MAX_GPUS_PER_NODE = 16
"""Most GPUs per node a single-node suggestion offers."""


def _feasible(cfg: Config, deadline: float) -> bool:
    left = min(PROBE_SECONDS, deadline - time.perf_counter())
    if left <= 0:
        return False
    try:
        # the probe solves MILPs, which model prefetching; fetching on demand is evaluated
        return probe(cfg, left).best is not None or on_demand_use(cfg)[1]
    except ConfigError:  # a changed config may have no executable layout at all
        return False


def _with(cfg: Config, **changes: dict) -> Config:
    return dataclasses.replace(
        cfg, **{k: dataclasses.replace(getattr(cfg, k), **v) for k, v in changes.items()}
    )


def _more_gpus(cfg: Config, deadline: float, single_node: bool) -> str | None:
    """More nodes (up to 64x), or on a single-node command more GPUs on its node."""
    key = "gpus_per_node" if single_node else "num_nodes"
    have = getattr(cfg.cluster, key)
    for factor in (2, 4, 8, 16, 32, 64):
        if time.perf_counter() > deadline or (single_node and have * factor > MAX_GPUS_PER_NODE):
            return None
        changed = _with(cfg, cluster={key: have * factor})
        if _feasible(changed, deadline):
            gpus = changed.cluster.world_size
            return f"{gpus} GPUs (cluster.{key}={have * factor})"
    return None


def _state_offload(cfg: Config, deadline: float) -> str | None:
    """Model states in host RAM, when the search did not consider them (planner.state_offload
    off, or auto on a cpu cluster, where the host is the device's own memory)."""
    if cfg.cluster.device != "cuda" or state_offload_enabled(cfg.cluster, cfg.planner):
        return None
    if _feasible(_with(cfg, planner={"state_offload": "on"}), deadline):
        return "model states in host RAM (planner.state_offload=on)"
    return None


def _shorter_sequence(cfg: Config, deadline: float) -> str | None:
    seq = cfg.train.seq_len
    quantum = 1024 if seq >= 16384 else 64 if seq >= 256 else 1
    lo, hi = 0, seq // quantum  # feasible at lo * quantum (0: unknown), infeasible at hi
    if hi <= 1 or not _feasible(_with(cfg, train={"seq_len": quantum}), deadline):
        return None
    lo = 1
    while hi - lo > 1 and time.perf_counter() < deadline:
        mid = (lo + hi) // 2
        if _feasible(_with(cfg, train={"seq_len": mid * quantum}), deadline):
            lo = mid
        else:
            hi = mid
    return f"train.seq_len<={lo * quantum}"


def explain_infeasible(cfg: Config, outcome: SearchOutcome, single_node: bool = False) -> str:
    """One line: what binds, how much is needed, and what would make a plan feasible
    (single_node: the command runs on one node, so never suggest more nodes)."""
    started = time.perf_counter()
    deadline = started + EXPLAIN_SECONDS
    candidates = layout_candidates(cfg)
    budget = candidates[0].costs.budget_bytes
    host_budget = candidates[0].costs.host_budget_bytes
    if not outcome.complete or not outcome.proven:
        return (
            f"no plan found within the time limits ({outcome.solved} of {outcome.considered} "
            f"layouts solved, some stopped early): raise planner.time_limit_seconds="
            f"{cfg.planner.time_limit_seconds:g} or planner.solve_time_limit_seconds="
            f"{cfg.planner.solve_time_limit_seconds:g}"
        )
    gpu_need = minimum_use(cfg, "gpu", deadline - time.perf_counter())
    if gpu_need is None:  # no minimal-memory solve finished: fall back to the bound
        gpu_need = min(c.memory_bound for c in candidates)
    on_demand_need, _ = on_demand_use(cfg)  # save_on_cpu's policy can need less
    if on_demand_need is not None:
        gpu_need = min(gpu_need, on_demand_need)
    suggestions = []
    if gpu_need > budget:
        head = (
            f"needs {gpu_need / GIB:.1f} GiB per GPU at best; budget {budget / GIB:.1f} GiB "
            f"(cluster.gpu_memory_gib={cfg.cluster.gpu_memory_gib:g} minus reserves)"
        )
    else:
        host_need = minimum_use(cfg, "host", deadline - time.perf_counter())
        if host_need is None or host_need <= host_budget:
            return (
                f"no layout of {cfg.cluster.world_size} GPUs fits the GPU and host memory "
                f"budgets together; try more GPUs or a shorter train.seq_len"
            )
        have = cfg.cluster.host_memory_gib
        reserve = cfg.planner.host_reserve_fraction
        needed_gib = math.ceil(host_need / GIB / (1.0 - reserve))
        for _ in range(3):  # verify; the plan's rounding margins may need a little more
            if _feasible(_with(cfg, cluster={"host_memory_gib": float(needed_gib)}), deadline):
                break
            needed_gib = math.ceil(needed_gib * 1.02 + 1)
        head = (
            f"host RAM binds: needs {host_need / GIB:.1f} GiB per node at best; budget "
            f"{host_budget / GIB:.1f} GiB (cluster.host_memory_gib={have:g} minus reserve)"
        )
        suggestions.append(f"cluster.host_memory_gib>={needed_gib}")
    found = [
        _state_offload(cfg, deadline),
        _more_gpus(cfg, deadline, single_node),
        _shorter_sequence(cfg, deadline),
    ]
    suggestions += [text for text in found if text]
    if suggestions:
        return f"{head}; feasible with {' or '.join(suggestions)}"
    gpus = f"up to {MAX_GPUS_PER_NODE} GPUs on this node" if single_node else "up to 64x the GPUs"
    return f"{head}; no tried change ({gpus}, shorter sequences) makes it feasible"
