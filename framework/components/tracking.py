"""Weights & Biases tracking on rank 0: offline by default, so it never touches the network."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from configs.schema import LoggingConfig
from framework.components.metrics import StepMetrics

logger = logging.getLogger(__name__)


class WandbTracker:
    """Logs metrics and attaches the resolved config; a no-op when logging.wandb=false."""

    def __init__(
        self, cfg: LoggingConfig, run_dir: Path, run_name: str, config: dict[str, Any]
    ) -> None:
        self.run = None
        if not cfg.wandb:
            return
        # Set before import: wandb reads these at import and init time.
        os.environ["WANDB_MODE"] = cfg.wandb_mode
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        self.run = wandb.init(
            project=cfg.wandb_project,
            name=run_name,
            dir=str(run_dir),
            config=config,
            mode=cfg.wandb_mode,
            settings=wandb.Settings(console="off"),
        )
        logger.info("wandb %s run in %s", cfg.wandb_mode, self.run.dir)

    def log(self, metrics: StepMetrics) -> None:
        """Record one metrics line."""
        if self.run is None:
            return
        self.run.log(
            {
                "loss": metrics.loss,
                "grad_norm": metrics.grad_norm,
                "mem_gib": metrics.mem_gib,
                "tokens_per_second": metrics.tokens_per_second,
                "tflops": metrics.tflops,
                "mfu": metrics.mfu,
            },
            step=metrics.step,
        )

    def log_eval(self, step: int, loss: float) -> None:
        """Record the validation loss after `step` optimizer steps (0: before the first)."""
        if self.run is None:
            return
        self.run.log({"eval/loss": loss}, step=step)

    def finish(self) -> None:
        """Flush and close the run."""
        if self.run is not None:
            self.run.finish()
            self.run = None
