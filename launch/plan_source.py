"""Where a command's plan comes from: plan.path, or the planner. One rule for every command
(plan, train, job), so a plan file is checked the same way wherever it is used.

A plan file is checked, before anything runs, against everything the runtime would otherwise
trip over or silently get wrong: readable UTF-8 JSON with every section, the model's
dimensions, the world size, the batch arithmetic (micro-batch x micro-batches x dp = the
global batch: an edited plan must not train on 15 of 16 sequences), the layout rules the
runtime executes (planner/layouts.py), per-layer fractions and modes, and the memory it was
planned for against this cluster's GPUs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from configs.checks import read_json_object
from configs.errors import ConfigError
from configs.schema import ClusterConfig, Config
from planner.plan import Plan, check_plan_matches
from planner.units import GIB

KEY = "plan.path"
SECTIONS = ("model", "train", "layout", "layers", "memory", "time", "solver")


def read_plan_file(path: str | Path) -> Plan:
    """The plan in `path`; a one-line ConfigError naming plan.path and the file for anything
    that is not a schema_version 1 plan JSON (binary, not JSON, missing sections, values out
    of range)."""
    data = read_json_object(path, KEY, kind="a plan JSON")
    missing = [name for name in SECTIONS if name not in data]
    if missing:
        raise ConfigError(
            KEY,
            f"{path}: missing {', '.join(missing)} (a plan JSON has {', '.join(SECTIONS)};"
            " write one with memplan plan plan.out=PATH)",
        )
    try:
        return Plan.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(KEY, f"{path}: {exc}") from exc


def planned_gpu_memory_bytes(plan: Plan) -> float | None:
    """Memory of the GPU the plan was made for (None: not recorded, e.g. a hand-made plan)."""
    if plan.cluster is not None:
        return plan.cluster.gpu_memory_gib * GIB
    return float(plan.memory.gpu_total_bytes) or None


def memory_notes(plan: Plan, cluster: ClusterConfig, path: str) -> list[str]:
    """Warnings about a plan made for other GPUs than this cluster's; ConfigError when its
    budget exceeds this cluster's GPU memory (it would run out of memory)."""
    have = cluster.gpu_memory_gib * GIB
    budget = plan.memory.gpu_budget_bytes
    if budget > have:
        raise ConfigError(
            KEY,
            f"{path} budgets {budget / GIB:.2f} GiB per GPU but cluster.gpu_memory_gib="
            f"{cluster.gpu_memory_gib:g}: it would run out of memory; plan again for this"
            " cluster (memplan plan plan.out=PATH) or set cluster.gpu_memory_gib",
        )
    planned = planned_gpu_memory_bytes(plan)
    if planned is None or abs(planned - have) <= 1e-6 * have:
        return []
    return [
        f"{path} was planned for {planned / GIB:.3g} GiB GPUs, this cluster has "
        f"{cluster.gpu_memory_gib:g} GiB (cluster.gpu_memory_gib): its offload and "
        "recomputation fit the other size; plan again to fit this one"
    ]


def check_plan_file(plan: Plan, cfg: Config, path: str) -> list[str]:
    """ConfigError (plan.path or the train.* key at fault) if the plan does not fit the config;
    returns warnings (one line each) about what fits but was planned differently."""
    from planner.layouts import check_layout  # the rules the runtime executes

    check_plan_matches(plan, cfg.model, cfg.cluster, cfg.train)
    try:
        check_layout(plan.layout, cfg.model, cfg.cluster, cfg.train)
    except ConfigError as exc:
        raise ConfigError(KEY, f"{path}: {exc}") from exc
    if plan.train.micro_batch_size != plan.layout.micro_batch_size:
        raise ConfigError(
            KEY,
            f"{path}: train.micro_batch_size={plan.train.micro_batch_size} differs from "
            f"layout.micro_batch_size={plan.layout.micro_batch_size}",
        )
    return memory_notes(plan, cfg.cluster, path)


def warn(notes: list[str], out: Any = None) -> None:
    """Print each note as one `memplan: warning:` line on stderr."""
    for note in notes:
        print(f"memplan: warning: {KEY}: {note}", file=out or sys.stderr)


def plan_for(cfg: Config, single_node: bool = False) -> Plan:
    """The plan in plan.path, checked against the config (ConfigError naming the key if it
    does not fit; a warning line if it was planned for other GPUs), or a fresh plan from the
    planner (NoFeasiblePlan if none fits; single_node: its fixes stay on one node, as for
    memplan train). The runtime executes plans; it never re-plans."""
    if cfg.plan.path:
        plan = read_plan_file(cfg.plan.path)
        warn(check_plan_file(plan, cfg, cfg.plan.path))
        return plan
    from planner.make import make_plan  # the solver stack loads only when planning

    return make_plan(cfg, single_node=single_node)
