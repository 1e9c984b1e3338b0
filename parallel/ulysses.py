"""Ulysses sequence parallelism: each sp rank holds a contiguous chunk of every sequence.

Everything in a decoder layer except the attention core is token-local, so it runs on the
chunk unchanged. Around the core, an all-to-all turns [batch, seq/sp, heads, d] (sequence
sharded) into [batch, seq, heads/sp, d] (head sharded), attention runs over the whole
sequence for its heads, and the inverse all-to-all restores the sequence sharding.

Grouped-query attention with fewer kv heads than sp ranks: each kv head is repeated
sp / kv_heads times first, so rank r receives kv head r * kv_heads // sp, the one its query
heads r * (heads/sp) ... share (backward sums the copies' gradients).
RoPE positions start at sp_rank * seq/sp (Transformer.sequence_parallel_rank).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from framework.components.model import AttentionFn, Transformer, causal_attention

# (tensor, scatter_dim, gather_dim) -> tensor: the exchange, injectable for unit tests.
Exchange = Callable[[Tensor, int, int], Tensor]


def all_to_all(x: Tensor, group: ProcessGroup, scatter_dim: int, gather_dim: int) -> Tensor:
    """Split x into group-size chunks along scatter_dim, send chunk j to rank j, and
    concatenate the chunks received (in rank order) along gather_dim. Differentiable."""
    return _AllToAll.apply(x, group, scatter_dim, gather_dim)


def _exchange(x: Tensor, group: ProcessGroup, scatter_dim: int, gather_dim: int) -> Tensor:
    size = dist.get_world_size(group)
    send = torch.stack(x.chunk(size, dim=scatter_dim)).contiguous()  # [size, *chunk]
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    return torch.cat(received.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, group: ProcessGroup, scatter_dim: int, gather_dim: int
    ) -> Tensor:
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return _exchange(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        # The inverse exchange: chunks go back where they came from.
        grad_x = _exchange(grad.contiguous(), ctx.group, ctx.gather_dim, ctx.scatter_dim)
        return grad_x, None, None, None


class UlyssesAttention:
    """A `core_fn` for [batch, seq/sp, heads, head_dim] q/k/v (heads already / tp)."""

    def __init__(self, sp_size: int, exchange: Exchange, inner: AttentionFn = causal_attention):
        self.sp_size = sp_size
        self.exchange = exchange
        self.inner = inner

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        sp, kv_heads = self.sp_size, k.shape[2]
        if kv_heads < sp:  # the layout rules guarantee sp % kv_heads == 0 here
            k = k.repeat_interleave(sp // kv_heads, dim=2)
            v = v.repeat_interleave(sp // kv_heads, dim=2)
        # sequence-sharded -> head-sharded: scatter heads (dim 2), gather sequence (dim 1)
        q, k, v = (self.exchange(t, 2, 1) for t in (q, k, v))
        out = self.inner(q, k, v)
        return self.exchange(out, 1, 2)  # head-sharded -> sequence-sharded


def apply_ulysses(model: Transformer, sp_group: ProcessGroup) -> None:
    """Route every attention core of `model` through the sp group and offset RoPE."""
    sp_size = dist.get_world_size(sp_group)
    if sp_size == 1:
        return

    def exchange(x: Tensor, scatter_dim: int, gather_dim: int) -> Tensor:
        return all_to_all(x, sp_group, scatter_dim, gather_dim)

    core = UlyssesAttention(sp_size, exchange)
    for layer in model.layers.values():
        layer.attention.core_fn = core
    model.sequence_parallel_rank = dist.get_rank(sp_group)


def sequence_chunk(tokens: Tensor, sp_rank: int, sp_size: int) -> Tensor:
    """This sp rank's contiguous chunk of dim 1 (every sp rank receives the same rows)."""
    chunk = tokens.shape[1] // sp_size
    return tokens[:, sp_rank * chunk : (sp_rank + 1) * chunk]
