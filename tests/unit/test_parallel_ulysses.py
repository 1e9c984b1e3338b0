"""Ulysses attention on simulated sp ranks (one thread each, an in-memory all-to-all): each
rank's output chunk equals full causal attention's, including grouped-query attention with
fewer kv heads than sp ranks (kv heads are repeated before the exchange)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from framework.components.model import causal_attention
from parallel.ulysses import UlyssesAttention, sequence_chunk


class SimulatedGroup:
    """all_to_all among `size` threads: chunk j of rank i goes to rank j."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size)
        self.sent: list[tuple[torch.Tensor, ...] | None] = [None] * size

    def exchange_for(self, rank: int):
        def exchange(x: torch.Tensor, scatter_dim: int, gather_dim: int) -> torch.Tensor:
            self.sent[rank] = x.chunk(self.size, dim=scatter_dim)
            self.barrier.wait()
            received = [self.sent[source][rank] for source in range(self.size)]
            self.barrier.wait()  # nobody overwrites `sent` before everyone has read it
            return torch.cat(received, dim=gather_dim)

        return exchange


@pytest.mark.parametrize(
    ("sp", "heads", "kv_heads"),
    [(2, 4, 2), (2, 4, 4), (4, 8, 2), (4, 4, 1), (2, 8, 8), (4, 8, 8)],
)
def test_each_rank_gets_its_chunk_of_full_attention(sp, heads, kv_heads):
    generator = torch.Generator().manual_seed(sp * 100 + heads * 10 + kv_heads)
    batch, seq, dim = 2, 16, 8
    q = torch.randn(batch, seq, heads, dim, generator=generator)
    k = torch.randn(batch, seq, kv_heads, dim, generator=generator)
    v = torch.randn(batch, seq, kv_heads, dim, generator=generator)
    want = causal_attention(q, k, v)

    group = SimulatedGroup(sp)

    def rank_output(rank: int) -> torch.Tensor:
        attention = UlyssesAttention(sp, group.exchange_for(rank))
        chunk = [sequence_chunk(t, rank, sp) for t in (q, k, v)]
        return attention(*chunk)

    with ThreadPoolExecutor(sp) as pool:
        outputs = list(pool.map(rank_output, range(sp)))
    for rank, out in enumerate(outputs):
        assert out.shape == (batch, seq // sp, heads, dim)
        torch.testing.assert_close(out, sequence_chunk(want, rank, sp), rtol=1e-5, atol=1e-6)


def test_sequence_chunk_is_contiguous_and_in_rank_order():
    tokens = torch.arange(24).reshape(2, 12)
    chunks = [sequence_chunk(tokens, r, 3) for r in range(3)]
    assert torch.equal(torch.cat(chunks, dim=1), tokens)
    assert chunks[1].tolist() == [[4, 5, 6, 7], [16, 17, 18, 19]]
