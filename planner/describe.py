"""One-line descriptions of a plan that the trainer's header and the plan tables share."""

from __future__ import annotations

from planner.plan import Plan

_OFFLOADED = {"all": ", states in host RAM", "optimizer": ", optimizer state in host RAM"}


def layout_summary(plan: Plan) -> str:
    """'dp2 tp1 pp2 sp1 | ZeRO-1 (fsdp2) | 1f1b, 2 stages per rank' (and, where offloaded
    activations come back tensor by tensor, '| activations fetched on demand')."""
    lay = plan.layout
    schedule = "no pipeline" if lay.pp == 1 else lay.pp_schedule
    if lay.virtual_stages > 1:
        schedule += f", {lay.virtual_stages} stages per rank"
    fetch = " | activations fetched on demand" if lay.activation_fetch == "on_demand" else ""
    return (
        f"dp{lay.dp} tp{lay.tp} pp{lay.pp} sp{lay.sp} | ZeRO-{lay.zero_stage} "
        f"({lay.zero_backend}{_OFFLOADED.get(lay.state_offload, '')})"
        f" | {schedule}{fetch}"
    )
