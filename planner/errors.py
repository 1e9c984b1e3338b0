"""Planner outcomes that are not bugs."""


class NoFeasiblePlan(Exception):
    """No layout/policy fits. The message names the binding constraint and the smallest change
    that makes a plan feasible (CLI exit code 3)."""
