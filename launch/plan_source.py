"""Where a command's plan comes from: plan.path, or the planner. One rule for every command
(plan, train, job, profile), so a plan file is checked the same way wherever it is used."""

from __future__ import annotations

from configs.schema import Config
from planner.plan import Plan, check_plan_matches


def plan_for(cfg: Config) -> Plan:
    """The plan in plan.path, checked against the config (model dims, world size, sequence
    length and batch: ConfigError naming the key if it does not fit), or a fresh plan from
    the planner (NoFeasiblePlan if none fits). The runtime executes plans; it never
    re-plans."""
    if cfg.plan.path:
        plan = Plan.read(cfg.plan.path)
        check_plan_matches(plan, cfg.model, cfg.cluster, cfg.train)
        return plan
    from planner.make import make_plan  # the solver stack loads only when planning

    return make_plan(cfg)
