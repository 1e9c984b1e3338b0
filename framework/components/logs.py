"""Logging setup for workers and the rank-0 helper for user-facing lines."""

import logging
import os
import sys
from pathlib import Path


def rank() -> int:
    """Global rank from torchrun's environment (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def setup_logging(log_file: Path | None = None, level: int = logging.INFO) -> None:
    """Plain `message` lines: rank 0 prints them on stdout (other ranks only warnings and
    errors), and every rank writes all of its lines to `log_file` when given.

    No prefix is added, so the metrics line starts with `step N | loss` on the console and in
    the files alike (the log contract in docs/ARCHITECTURE.md).
    """
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(level if rank() == 0 else logging.WARNING)
    handlers: list[logging.Handler] = [console]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(level)


def log_rank0(logger: logging.Logger, message: str) -> None:
    """Log a user-facing line from rank 0 only."""
    if rank() == 0:
        logger.info(message)
