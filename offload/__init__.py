"""Per-layer activation memory runtime: token-wise offload and recomputation from the plan.

    runtime = apply_activation_plan(model.layers.values(), plan.layers)
    ... forward/backward as usual ...
    runtime.layer_stats()   # measured device / host / recomputed bytes per layer

See offload/engine.py for what happens to each saved tensor.
"""

from offload.apply import (
    ActivationRuntime,
    apply_activation_plan,
    apply_activation_policy,
    apply_layer_policies,
    remove_activation_policy,
    reserve_host_memory,
    reserve_plan_host_memory,
)
from offload.engine import LayerActivationEngine, LayerActivationStats, token_segments
from offload.pool import HostBufferPool

__all__ = [
    "ActivationRuntime",
    "HostBufferPool",
    "LayerActivationEngine",
    "LayerActivationStats",
    "apply_activation_plan",
    "apply_activation_policy",
    "apply_layer_policies",
    "remove_activation_policy",
    "reserve_host_memory",
    "reserve_plan_host_memory",
    "token_segments",
]
