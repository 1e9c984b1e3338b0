"""Recompute modes: the set (planner.plan.Recompute), the orders that mean something, and
where each mode runs. One place, so the cost model, the MILP and the plan agree.

    none        keeps every saved tensor (token-local ones may be offloaded or recomputed)
    selective   also recomputes the cheap memory-heavy ops of every token
    full        keeps only the layer input and runs the whole forward again in backward
"""

from __future__ import annotations

from typing import get_args

from planner.plan import Layout, Recompute

RECOMPUTE_MODES: tuple[Recompute, ...] = get_args(Recompute)
"""Every mode, in the order of the Literal ("none", "selective", "full"): the order of the
cost model's per-mode coefficients and of the MILP's per-mode variables and rows."""
SPLIT_MODES: tuple[Recompute, ...] = tuple(m for m in RECOMPUTE_MODES if m != "full")
"""Modes whose token-local tensors can be split into offloaded / recomputed / kept tokens
(full keeps none of them)."""
STAGE_LAYER_ORDER: tuple[Recompute, ...] = ("full", "selective", "none")
"""Order of a stage's layers by mode in the emitted plan (planner/assemble.py)."""
BACKWARD_GROUP_ORDER: tuple[Recompute, ...] = STAGE_LAYER_ORDER[::-1]
"""Order in which backward, running a stage's layers last to first, reaches its mode groups
(the MILP's one-micro-batch peak rows, planner/milp.py)."""


def full_recompute_runs(layout: Layout) -> bool:
    """Whole-layer recomputation runs under `layout`: not under DeepSpeed ZeRO-3, whose engine
    has released the parameters the recomputed layer needs by backward (the runtime refuses
    such a plan: planner.layouts.plan_problems, called by parallel/dims.py)."""
    return not (layout.zero_backend == "deepspeed" and layout.zero_stage == 3)
