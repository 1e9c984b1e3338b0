"""The run directory: resolved.yaml, plan.json, per-rank logs, checkpoints, the wandb run."""

from __future__ import annotations

import time
from pathlib import Path

from configs.errors import ConfigError
from configs.schema import Config
from launch.compose import dump_resolved
from planner.plan import Plan


def prepare_run_dir(cfg: Config, plan: Plan) -> Path:
    """Create the run directory and write what the workers read (they never run Hydra)."""
    if cfg.launch.run_dir:
        run_dir = Path(cfg.launch.run_dir)
    else:
        run_dir = Path("runs") / f"{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "resolved.yaml").write_text(dump_resolved(cfg))
        plan.write(run_dir / "plan.json")
    except OSError as exc:
        raise ConfigError("launch.run_dir", f"cannot write {run_dir}: {exc.strerror}") from exc
    return run_dir.resolve()
