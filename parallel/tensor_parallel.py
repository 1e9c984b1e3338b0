"""Tensor parallelism with DTensor (Megatron's column/row split of attention and MLP).

Column-wise wq/wk/wv/w1/w3 (each rank computes heads/tp heads and ffn/tp of the MLP),
row-wise wo/w2 (partial sums all-reduced into the replicated residual stream). Embeddings,
norms and the output projection stay replicated over tp; their gradients are identical on
every tp rank because the residual stream is. Attention reshapes with -1 heads
(framework.components.model.Attention.project_qkv), so it runs on the local heads unchanged.
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)

from framework.components.model import Transformer

LAYER_PLAN = {
    "attention.wq": ColwiseParallel,
    "attention.wk": ColwiseParallel,
    "attention.wv": ColwiseParallel,
    "attention.wo": RowwiseParallel,
    "feed_forward.w1": ColwiseParallel,
    "feed_forward.w3": ColwiseParallel,
    "feed_forward.w2": RowwiseParallel,
}


def apply_tensor_parallel(model: Transformer, tp_mesh: DeviceMesh) -> None:
    """Shard every decoder layer's projections over tp_mesh (no-op for tp = 1)."""
    if tp_mesh.size() == 1:
        return
    for layer in model.layers.values():
        parallelize_module(layer, tp_mesh, {name: style() for name, style in LAYER_PLAN.items()})
