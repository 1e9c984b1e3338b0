"""Entry point of every torchrun worker: `python -m launch.worker RUN_DIR`.

Each rank writes its lines to RUN_DIR/logs/rank<R>.log; rank 0 also prints them.

Workers load RUN_DIR/resolved.yaml and RUN_DIR/plan.json written by the launcher; they never
run Hydra (so ranks do not race on Hydra output directories).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from configs.errors import ConfigError
from framework.components.distributed import shutdown_distributed
from framework.components.logs import rank, setup_logging
from framework.trainer import train
from launch.compose import load_resolved
from planner.plan import Plan

logger = logging.getLogger(__name__)


def main(argv: list[str]) -> int:
    """Train the run in argv[0]; exit code 2 on bad input (one line, no traceback)."""
    if len(argv) != 1:
        setup_logging()
        logger.error("usage: python -m launch.worker RUN_DIR")
        return 2
    run_dir = Path(argv[0])
    setup_logging(run_dir / "logs" / f"rank{rank()}.log")
    try:
        cfg = load_resolved(str(run_dir / "resolved.yaml"))
        plan = Plan.read(run_dir / "plan.json")
        train(cfg, plan, run_dir)
    except ConfigError as exc:  # the same input on every rank: every rank stops here
        logger.error("memplan worker: error: %s", exc)
        shutdown_distributed()
        return 2
    # Only after success: a rank that failed must not wait in a collective teardown for
    # peers that may still be inside a collective (torchrun stops them when this one exits).
    shutdown_distributed()
    return 0


if __name__ == "__main__":  # async_save in process mode re-imports the main module
    sys.exit(main(sys.argv[1:]))
