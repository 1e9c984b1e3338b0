"""Run the `memplan` console script of this environment as a user would (integration tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

HANG_SECONDS = 900
"""Only a hang reaches this: a loaded 2-core CI machine runs the slowest command in minutes."""


def memplan(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """`memplan ARGS` (the console script beside this Python, else the module), captured;
    wide tables (COLUMNS=160) and the repository importable from any cwd."""
    script = Path(sys.executable).parent / "memplan"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "launch.cli"]
    base = os.environ.copy() if env is None else env
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        env={"COLUMNS": "160", **base, "PYTHONPATH": str(REPO)},
        cwd=cwd or REPO,
        timeout=HANG_SECONDS,
        check=False,
    )
