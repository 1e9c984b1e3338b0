"""HiGHS's process-wide quirks, kept apart from the MILP (planner/milp.py) that uses it."""

from __future__ import annotations

import contextlib
import os

_BANNER_SILENCED = False


def silence_highs_banner() -> None:
    """highspy prints a banner to stdout when its first Highs object is created, whatever
    the options; create that first object with stdout pointed at /dev/null."""
    global _BANNER_SILENCED
    if _BANNER_SILENCED:
        return
    _BANNER_SILENCED = True
    import highspy

    with contextlib.ExitStack() as stack:
        saved = os.dup(1)
        stack.callback(os.close, saved)
        devnull = os.open(os.devnull, os.O_WRONLY)
        stack.callback(os.close, devnull)
        os.dup2(devnull, 1)
        stack.callback(os.dup2, saved, 1)
        highspy.Highs()
