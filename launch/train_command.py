"""`memplan train`: plan (or reuse plan.path), write the run directory, run torchrun."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from configs.schema import Config
from launch.compose import compose_config
from launch.run_dir import prepare_run_dir
from planner.plan import Plan, check_plan_matches


def plan_for(cfg: Config) -> Plan:
    """The plan in plan.path, or a fresh one from the planner; checked against the config."""
    if cfg.plan.path:
        plan = Plan.read(cfg.plan.path)
    else:
        from planner.search import make_plan

        plan = make_plan(cfg)
    check_plan_matches(plan, cfg.model, cfg.cluster, cfg.train)
    return plan


def torchrun_command(run_dir: Path, nproc_per_node: int, max_restarts: int) -> list[str]:
    """torchrun on this node: every rank logs to run_dir/logs, the console shows rank 0."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc_per_node}",
        f"--max-restarts={max_restarts}",
        f"--log-dir={run_dir / 'logs'}",
        "--tee=3",
        "--local-ranks-filter=0",
        "-m", "launch.worker", str(run_dir),
    ]  # fmt: skip


def run(args: list[str]) -> int:
    """Compose, plan, write the run directory and run the workers; returns their exit code."""
    cfg = compose_config(args)
    plan = plan_for(cfg)
    run_dir = prepare_run_dir(cfg, plan)
    command = torchrun_command(run_dir, plan.layout.world_size, cfg.launch.max_restarts)
    if cfg.launch.dry_run:
        print(shlex.join(command))
        return 0
    print(f"run directory: {run_dir}", flush=True)
    return subprocess.call(command)
