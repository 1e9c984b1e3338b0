"""`memplan train`: plan (or reuse plan.path), write the run directory, exec torchrun.

torchrun runs standalone on this node with the plan's world size: every rank's stdout and
stderr go to RUN_DIR/logs/<run id>/attempt_<n>/<local rank>/, and the console shows rank 0.
Several nodes need `memplan job` (SLURM, or per-node torchrun commands).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from configs.errors import ConfigError
from configs.schema import ClusterConfig
from configs.tokens import check_token_file
from launch.compose import compose_config
from launch.plan_source import plan_for
from launch.run_dir import prepare_run_dir


def torchrun_prefix() -> list[str]:
    """How to start torchrun with this Python (the one memplan is installed in): the
    `torchrun` script beside the interpreter, else `python -m torch.distributed.run`."""
    script = Path(sys.executable).parent / "torchrun"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "torch.distributed.run"]


def redirect_other_local_ranks(nproc_per_node: int) -> list[str]:
    """torchrun flags sending the raw stdout/stderr of local ranks 1.. to files in --log-dir.

    Local rank 0 keeps the console without torchrun's `[default0]:` prefix (which --tee would
    add), so metrics lines start with `step N | loss`; every worker also writes its own
    RUN_DIR/logs/rank<R>.log (launch/worker.py).
    """
    if nproc_per_node == 1:
        return []
    return ["--redirects=" + ",".join(f"{rank}:3" for rank in range(1, nproc_per_node))]


def torchrun_command(run_dir: Path, nproc_per_node: int, max_restarts: int) -> list[str]:
    """torchrun on this node: every rank logs to run_dir/logs, the console shows rank 0."""
    return [
        *torchrun_prefix(),
        "--standalone",
        f"--nproc-per-node={nproc_per_node}",
        f"--max-restarts={max_restarts}",
        f"--log-dir={run_dir / 'logs'}",
        *redirect_other_local_ranks(nproc_per_node),
        "-m", "launch.worker", str(run_dir),
    ]  # fmt: skip


def check_single_node(cluster: ClusterConfig) -> None:
    """`memplan train` runs every rank on this machine: refuse what cannot run here."""
    if cluster.num_nodes > 1:
        raise ConfigError(
            "cluster.num_nodes",
            f"{cluster.num_nodes} nodes: memplan train runs on this node only; use memplan job"
            " (job.scheduler=slurm, or job.scheduler=torchrun without SLURM)",
        )
    if cluster.device == "cuda":
        import torch  # only here: the CPU path never pays for importing torch in the launcher

        found = torch.cuda.device_count()
        if found < cluster.gpus_per_node:
            raise ConfigError(
                "cluster.gpus_per_node",
                f"{cluster.gpus_per_node} but this machine has {found} CUDA device(s)",
            )


def run(args: list[str]) -> int:
    """Compose, plan, write the run directory, then replace this process with torchrun (its
    exit code is the command's). launch.dry_run=true prints the command instead."""
    cfg = compose_config(args)
    plan = plan_for(cfg)
    check_single_node(cfg.cluster)
    check_token_file(cfg.data)  # before anything is written or started
    run_dir = prepare_run_dir(cfg, plan)
    command = torchrun_command(run_dir, plan.layout.world_size, cfg.launch.max_restarts)
    if cfg.launch.dry_run:
        print(shlex.join(command))
        return 0
    print(f"run directory: {run_dir}", flush=True)
    sys.stderr.flush()
    os.execv(command[0], command)  # signals (Ctrl-C, SLURM's SIGTERM) reach torchrun directly
    raise AssertionError("unreachable: execv returned")
