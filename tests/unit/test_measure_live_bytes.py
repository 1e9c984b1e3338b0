"""framework/measure/live_bytes.py: LiveBytes counts what aten ops create, exactly, until it
dies; host storages apart; the host-tagged pool and the save_on_cpu emulation count as host."""

import torch

from framework.measure.live_bytes import HostSaved, HostTaggedPool, LiveBytes

CPU = torch.device("cpu")


def test_counts_a_known_allocation_exactly_and_releases_it_on_free():
    with LiveBytes() as live:
        x = torch.empty(1000, dtype=torch.float32)
        assert live.live["device"] == 4000
        y = x.view(10, 100)  # a view creates no storage
        x.add_(1.0)  # nor does an in-place op
        assert live.live["device"] == 4000
        z = torch.ones(250, dtype=torch.float64)
        assert live.live["device"] == 6000
        del x, y
        assert live.live["device"] == 2000
        del z
        assert live.live["device"] == 0
    assert live.peak["device"] == 6000
    assert live.live["host"] == live.peak["host"] == 0


def test_tensors_created_before_are_not_counted():
    before = torch.zeros(1024)
    with LiveBytes() as live:
        before.mul_(2.0)
        after = before + 1.0  # a new 4 KiB storage
    assert live.peak["device"] == 4096
    del after
    assert live.live["device"] == 0


def test_host_storages_are_counted_apart():
    live = LiveBytes()
    with live:
        with live.host():
            host = torch.zeros(300, dtype=torch.int8)
        device = torch.zeros(10, dtype=torch.int8)
        assert (live.live["host"], live.live["device"]) == (300, 10)
        del host
        assert live.live["host"] == 0
    assert live.peak == {"device": 10, "host": 300}
    del device


def test_host_tagged_pool_slabs_count_as_host():
    live = LiveBytes()
    pool = HostTaggedPool(live)
    with live:
        pool.reserve([8192])
    assert live.live["host"] == 8192 and live.live["device"] == 0
    assert pool.allocations == 1 and pool.allocated_bytes == 8192


def test_save_on_cpu_emulation_moves_saved_tensors_to_the_host():
    live, counter = LiveBytes(), [0]
    weight = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(8, 64)
    with live, HostSaved(CPU, live, counter):
        loss = (x @ weight).tanh().sum()
    # x (saved by the matmul) and tanh's output, 8 x 64 fp32 each, copied to the host
    assert counter[0] == 2 * 8 * 64 * 4
    assert live.peak["host"] >= counter[0]
    loss.backward()
    assert weight.grad is not None and weight.grad.shape == (64, 64)
