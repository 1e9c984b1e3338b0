"""One process executes the plan's per-layer activation policies (framework/runtime.py's
build_local_runtime): the layers that offload or recompute run through the offload engine,
their host slabs are allocated from the plan before step 1, and training is exactly the
plain run's (fp32 on CPU)."""

from __future__ import annotations

import dataclasses

import torch

from framework.runtime import build_local_runtime
from offload import pool as pool_module
from planner.plan import LayerPlan
from tests.plans import manual_plan

# layer 0 keeps everything, the others offload / recompute in different ways
POLICIES = [
    (0.0, "none", 0.0, 0.0),
    (0.5, "none", 0.25, 1.0),
    (0.0, "selective", 0.5, 0.0),
    (0.0, "full", 0.0, 1.0),
]


def _config(tiny_config):
    train = dataclasses.replace(tiny_config.train, seq_len=64, global_batch_size=4, steps=3)
    model = dataclasses.replace(tiny_config.model, num_layers=len(POLICIES))
    return dataclasses.replace(tiny_config, train=train, model=model)


def _plan(cfg, with_policies: bool):
    layers = None
    if with_policies:
        layers = [LayerPlan(i, 0, a, r, rf, b) for i, (a, r, rf, b) in enumerate(POLICIES)]
    return manual_plan(cfg, layers, micro_batch_size=2)


def _build(cfg, plan):
    return build_local_runtime(cfg.model, cfg.train, plan, torch.device("cpu"), torch.float32)


def _train(cfg, plan, steps: int = 3, runtime=None):
    runtime = runtime or _build(cfg, plan)
    generator = torch.Generator().manual_seed(0)
    losses, allocations = [], []
    for _ in range(steps):
        tokens = torch.randint(0, cfg.model.vocab_size, (4, 65), generator=generator)
        out = runtime.train_step(tokens[:, :-1], tokens[:, 1:])
        losses.append(float(out.loss))
        pool = runtime.activation_runtime.pool
        allocations.append(pool.allocations if pool is not None else 0)
    params = {name: p.detach().clone() for name, p in runtime.model.named_parameters()}
    return runtime, losses, allocations, params


def test_policies_run_and_train_exactly_like_the_plain_model(tiny_config):
    cfg = _config(tiny_config)
    plain, plain_losses, _, plain_params = _train(cfg, _plan(cfg, False))
    assert plain.activation_runtime.engines == {}
    planned, losses, _, params = _train(cfg, _plan(cfg, True))
    assert sorted(planned.activation_runtime.engines) == [1, 2, 3]  # layer 0 keeps all
    for got, want in zip(losses, plain_losses, strict=True):
        assert abs(got - want) <= 1e-6 * abs(want)
    for name, want in plain_params.items():
        torch.testing.assert_close(params[name], want, rtol=1e-5, atol=1e-6)
    # the engines measured what the policies say: layer 1 moved bytes to the host
    stats = planned.activation_runtime.layer_stats()
    assert stats[1].host_bytes > 0 and stats[3].host_bytes > 0 and stats[2].host_bytes == 0


def test_host_slabs_come_from_the_plan_before_step_1(tiny_config, monkeypatch):
    calls = []
    original = pool_module.allocate_host_buffer

    def counting(nbytes: int, pin_memory: bool) -> torch.Tensor:
        calls.append(nbytes)
        return original(nbytes, pin_memory)

    monkeypatch.setattr(pool_module, "allocate_host_buffer", counting)
    cfg = _config(tiny_config)
    plan = _plan(cfg, True)
    runtime = _build(cfg, plan)
    assert len(calls) == 2  # layers 1 and 3 offload; layer 2 only recomputes
    _, _, allocations, _ = _train(cfg, plan, steps=3, runtime=runtime)
    assert allocations == [2, 2, 2] and len(calls) == 2  # not even step 1 allocated
    runtime.close()
    assert all(layer.activation_policy is None for layer in runtime.model.layers.values())
