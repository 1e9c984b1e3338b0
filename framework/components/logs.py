"""Logging setup for workers and the rank-0 helper for user-facing lines."""

import logging
import os
import sys
from pathlib import Path


def rank() -> int:
    """Global rank from torchrun's environment (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


OWN_PACKAGES = frozenset({"configs", "framework", "launch", "offload", "parallel", "planner"})
"""memplan's own top-level packages: their lines are the console's."""


class OwnLinesOnly(logging.Filter):
    """The console's filter: memplan's own lines, and anyone's errors. Other libraries' info
    and warnings (DeepSpeed's compiler probes, which log through the root logger; Python
    warnings such as torch's per-step FutureWarnings) go to the rank log only."""

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name.split(".")[0] in OWN_PACKAGES or record.name == "__main__"
        return own or record.levelno >= logging.ERROR


class WarningText(logging.Filter):
    """A Python warning's text without the newline warnings.formatwarning ends it with."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "py.warnings":
            record.msg, record.args = record.getMessage().rstrip("\n"), ()
        return True


class EachWarningOnce(logging.Filter):
    """The rank log's filter: a Python warning once per distinct text. torch warns about the
    same deprecated collective on every step (its own warning registry is reset whenever a
    library changes the warning filters)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "py.warnings":
            return True
        text = record.getMessage()
        if text in self.seen:
            return False
        self.seen.add(text)
        return True


def setup_logging(log_file: Path | None = None, level: int = logging.INFO) -> None:
    """Plain `message` lines: rank 0 prints them on stdout (other ranks only warnings and
    errors), and every rank writes all of its lines to `log_file` when given.

    Quiet by default: the console shows memplan's own lines and errors (OwnLinesOnly; see
    show_library_lines); the file gets every line, other libraries' and Python's warnings
    (each distinct one once) included.

    No prefix is added, so the metrics line starts with `step N | loss` on the console and in
    the files alike (the log contract in docs/ARCHITECTURE.md).
    """
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(level if rank() == 0 else logging.WARNING)
    console.addFilter(WarningText())
    console.addFilter(OwnLinesOnly())
    handlers: list[logging.Handler] = [console]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(log_file)
        file.addFilter(WarningText())
        file.addFilter(EachWarningOnce())
        handlers.append(file)
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger -> these handlers


def show_library_lines() -> None:
    """logging.console=all: drop the console's OwnLinesOnly filter (set up before the config
    was read)."""
    for handler in logging.getLogger().handlers:
        for found in [f for f in handler.filters if isinstance(f, OwnLinesOnly)]:
            handler.removeFilter(found)


def adopt_library_logger(name: str) -> None:
    """Make a library's logger that prints to its own console handler (DeepSpeed's) log
    through the handlers above instead: its lines reach the rank log, not the console."""
    library = logging.getLogger(name)
    for handler in list(library.handlers):
        library.removeHandler(handler)
    library.propagate = True


def log_rank0(logger: logging.Logger, message: str) -> None:
    """Log a user-facing line from rank 0 only."""
    if rank() == 0:
        logger.info(message)
