"""AdamW parameter groups and the warm-up + cosine schedule."""

import dataclasses
import itertools

import pytest
import torch

from configs.schema import TrainConfig
from framework.components import optim
from framework.components.model import build_model, materialize
from framework.components.optim import build_optimizer, lr_multiplier
from launch.compose import compose_config


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_multiplier(0, cfg) == pytest.approx(0.1)
    assert lr_multiplier(9, cfg) == pytest.approx(1.0)
    assert lr_multiplier(10, cfg) == pytest.approx(1.0)
    assert lr_multiplier(55, cfg) == pytest.approx(0.55)
    assert lr_multiplier(100, cfg) == pytest.approx(0.1)
    values = [lr_multiplier(step, cfg) for step in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_weight_decay_skips_norms_and_biases():
    model_cfg = dataclasses.replace(compose_config([]).model, qkv_bias=True)
    model = materialize(build_model(model_cfg), "cpu", 0)
    optimizer = build_optimizer([model], TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    assert all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_cpu_adamw_is_fused_and_matches_the_foreach_step(monkeypatch):
    model_cfg = compose_config([]).model
    cpu = torch.device("cpu")
    results = []
    for fused in (True, False):
        if not fused:  # what build_optimizer does on a device without a fused kernel
            monkeypatch.setattr(optim, "FUSED_ADAMW_DEVICES", ())
        model = materialize(build_model(model_cfg), "cpu", 0)
        torch.manual_seed(1)
        for param in model.parameters():
            param.grad = torch.randn_like(param)
        optimizer = build_optimizer([model], TrainConfig(weight_decay=0.1), cpu)
        assert bool(optimizer.defaults["fused"]) is fused
        for _ in range(3):
            optimizer.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for fused_value, foreach_value in zip(*results, strict=True):
        torch.testing.assert_close(fused_value, foreach_value, rtol=1e-6, atol=1e-7)
