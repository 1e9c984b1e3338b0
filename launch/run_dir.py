"""The run directory: resolved.yaml, plan.json, per-rank logs, checkpoints, the wandb run.

Workers find everything they need in it (they never run Hydra), so a torchrun command or a
job script that names the directory runs exactly what was planned, from any working directory.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from configs.errors import ConfigError
from configs.schema import Config
from launch.compose import dump_resolved
from planner.plan import Plan


def default_run_dir(cfg: Config) -> Path:
    """launch.run_dir, or runs/<model>-<timestamp> under the working directory."""
    if cfg.launch.run_dir:
        return Path(cfg.launch.run_dir)
    return Path("runs") / f"{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def pin_paths(cfg: Config, run_dir: Path) -> Config:
    """The config with every path absolute and checkpoint.dir explicit, as workers must see it:
    they may start in another directory, and a restarted or requeued job must find the same
    checkpoints (checkpoint.dir defaults to <run dir>/checkpoints)."""
    run_dir = run_dir.resolve()
    checkpoint_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"
    data_path = str(Path(cfg.data.path).resolve()) if cfg.data.path else None
    hf_config = str(Path(cfg.model.hf_config).resolve()) if cfg.model.hf_config else None
    return replace(
        cfg,
        model=replace(cfg.model, hf_config=hf_config),
        data=replace(cfg.data, path=data_path),
        checkpoint=replace(cfg.checkpoint, dir=str(checkpoint_dir.resolve())),
        launch=replace(cfg.launch, run_dir=str(run_dir)),
    )


def prepare_run_dir(
    cfg: Config, plan: Plan, run_dir: Path | None = None, key: str = "launch.run_dir"
) -> Path:
    """Create the run directory (default: default_run_dir) and write resolved.yaml and
    plan.json into it; returns its absolute path. Errors name `key`."""
    run_dir = (run_dir or default_run_dir(cfg)).resolve()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "resolved.yaml").write_text(dump_resolved(pin_paths(cfg, run_dir)))
        plan.write(run_dir / "plan.json")
    except OSError as exc:
        raise ConfigError(key, f"cannot write {run_dir}: {exc.strerror}") from exc
    return run_dir
