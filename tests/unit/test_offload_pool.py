"""Host slabs: allocated in the first step (or before the loop, from the plan), then reused;
the training loop never allocates host memory again."""

import pytest
import torch

import offload.pool
from framework.components.loss import chunked_cross_entropy
from framework.components.model import build_model, materialize
from launch.compose import compose_config
from offload import HostBufferPool, apply_activation_plan, reserve_host_memory
from offload.pool import ALIGN_BYTES, SlabLease
from planner.activations import LayerShape, layer_activation_bytes
from planner.plan import LayerPlan

POLICIES = [
    LayerPlan(0, 0, 0.5, "none", 0.25, 1.0),
    LayerPlan(1, 0, 0.0, "full", 0.0, 0.5),
    LayerPlan(2, 0, 0.3, "selective", 0.3, 0.0),
    LayerPlan(3, 0, 0.0, "none", 0.5, 0.0),  # nothing on the host: no slab
]
BATCH, SEQ, MICRO_BATCHES = 2, 48, 2


@pytest.fixture
def counted_allocations(monkeypatch):
    """Every host slab allocation, as (nbytes, pin_memory)."""
    calls: list[tuple[int, bool]] = []
    original = offload.pool.allocate_host_buffer

    def counting(nbytes, pin_memory):
        calls.append((nbytes, pin_memory))
        return original(nbytes, pin_memory)

    monkeypatch.setattr(offload.pool, "allocate_host_buffer", counting)
    return calls


def _train(pool, steps, after_step=None):
    cfg = compose_config([]).model
    model = materialize(build_model(cfg), "cpu", 0)
    runtime = apply_activation_plan(model.layers.values(), POLICIES, pool)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        for _ in range(MICRO_BATCHES):  # gradient accumulation
            tokens = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=generator)
            hidden = model(tokens[:, :-1])
            loss = chunked_cross_entropy(hidden, model.output_weight(), tokens[:, 1:], 64)
            (loss / MICRO_BATCHES).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step(step, runtime)
    return cfg, runtime


def test_no_host_allocation_after_the_first_step(counted_allocations):
    pool = HostBufferPool()
    per_step = []
    _train(pool, 4, lambda step, runtime: per_step.append(len(counted_allocations)))
    assert per_step[0] == 3, "one slab per layer that offloads anything"
    assert per_step == [per_step[0]] * 4, "steps 2-4 reuse the slabs of step 1"
    assert pool.allocations == per_step[0]
    assert pool.in_use_bytes == 0, "every slab came back after its backward"
    assert all(pin == torch.cuda.is_available() for _, pin in counted_allocations)


def test_slabs_reserved_from_the_plan_serve_every_step(counted_allocations):
    cfg = compose_config([]).model
    shape = LayerShape.of(cfg, 4)
    predicted = [layer_activation_bytes(shape, BATCH, SEQ, p).host_bytes for p in POLICIES]
    pool = HostBufferPool()
    reserve_host_memory(pool, predicted)
    reserved = len(counted_allocations)
    assert reserved == 3
    _train(pool, 3)
    assert len(counted_allocations) == reserved, "the loop allocated host memory"


def test_best_fit_within_the_slack():
    pool = HostBufferPool(pin_memory=False)
    pool.reserve([4 * ALIGN_BYTES, 64 * 2**20])
    small, _ = pool.acquire(3 * ALIGN_BYTES)
    assert small.numel() == 4 * ALIGN_BYTES, "the smallest slab that fits"
    other, _ = pool.acquire(3 * ALIGN_BYTES)
    assert other.numel() == 3 * ALIGN_BYTES, "a 64 MiB slab is too big for 768 bytes: allocate"
    assert pool.allocations == 3
    pool.release(small, None)
    pool.release(other, None)
    assert pool.in_use_bytes == 0
    big, _ = pool.acquire(63 * 2**20)
    assert big.numel() == 64 * 2**20


def test_a_lease_returns_its_slab_when_dropped():
    pool = HostBufferPool(pin_memory=False)
    lease = SlabLease(pool, 1000)
    piece = lease.piece(ALIGN_BYTES, 16, torch.float32)
    assert piece.shape == (4,) and piece.dtype == torch.float32
    assert pool.in_use_bytes == 4 * ALIGN_BYTES
    del lease, piece
    assert pool.in_use_bytes == 0
    again = SlabLease(pool, 900)
    assert pool.allocations == 1
    del again


def test_pinned_memory_only_with_cuda():
    assert HostBufferPool().pin_memory == torch.cuda.is_available()


def test_measurements_repeat_every_step_and_match_the_prediction():
    seen = []
    cfg, _ = _train(HostBufferPool(), 3, lambda step, runtime: seen.append(runtime.layer_stats()))
    assert len(seen) == 3 and seen[0] == seen[1] == seen[2]
    shape = LayerShape.of(cfg, 4)
    for policy in POLICIES:
        predicted = layer_activation_bytes(shape, BATCH, SEQ, policy)
        assert seen[-1][policy.index].host_bytes == predicted.host_bytes
        assert seen[-1][policy.index].device_bytes == predicted.device_bytes


def test_a_graph_dropped_without_backward_frees_its_slabs_at_once():
    """No reference cycle (a saved output holding its own grad_fn) keeps a layer alive."""
    import gc

    cfg = compose_config([]).model
    model = materialize(build_model(cfg), "cpu", 0)
    pool = HostBufferPool()
    runtime = apply_activation_plan(model.layers.values(), POLICIES, pool)
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, SEQ))
    gc.disable()
    try:
        hidden = model(tokens)
        assert pool.in_use_bytes > 0
        assert runtime.engines[0].last_forward() is not None
        del hidden
        assert pool.in_use_bytes == 0
        assert runtime.engines[0].last_forward() is None
    finally:
        gc.enable()
