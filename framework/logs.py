"""Logging setup for workers and the rank-0 helper for user-facing lines."""

import logging
import os
import sys


def rank() -> int:
    """Global rank from torchrun's environment (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def setup_logging(level: int = logging.INFO) -> None:
    """Plain `message` lines on stdout; other ranks only log warnings and errors."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if rank() == 0 else logging.WARNING)


def log_rank0(logger: logging.Logger, message: str) -> None:
    """Log a user-facing line from rank 0 only."""
    if rank() == 0:
        logger.info(message)
