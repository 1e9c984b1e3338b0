"""framework/measure/optimizer.py: the runtime's AdamW for fp32 weights; for bf16 weights its
groups and hyper-parameters on fp32 master weights and moments, because build_optimizer on
bf16 weights holds half the bytes per parameter that the plan counts."""

import torch
from torch import nn

from configs.schema import TrainConfig
from framework.components.optim import build_lr_scheduler, build_optimizer
from framework.measure.optimizer import (
    MixedPrecisionAdamW,
    build_measure_optimizer,
    optimizer_state_tensors,
)
from framework.measure.setup import STATE_BYTES_PER_PARAM

CPU = torch.device("cpu")


def _model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 48), nn.LayerNorm(48), nn.Linear(48, 16)).to(dtype)


def _state_bytes_per_param(model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
    for param in model.parameters():
        param.grad = torch.full_like(param, 0.01)
    optimizer.step()
    params = list(model.parameters())
    total = sum(p.nbytes + p.grad.nbytes for p in params)
    total += sum(t.nbytes for t in optimizer_state_tensors(optimizer))
    return total / sum(p.numel() for p in params)


def test_build_optimizer_on_bf16_weights_holds_8_bytes_per_parameter_not_16():
    """Why the measurement does not step build_optimizer's AdamW on bf16 weights."""
    model = _model(torch.bfloat16)
    assert _state_bytes_per_param(model, build_optimizer([model], TrainConfig(), CPU)) == 8


def test_measure_optimizer_holds_the_plans_16_bytes_per_parameter_in_both_dtypes():
    for dtype in (torch.float32, torch.bfloat16):
        model = _model(dtype)
        optimizer = build_measure_optimizer(model, TrainConfig(), CPU)
        assert _state_bytes_per_param(model, optimizer) == STATE_BYTES_PER_PARAM, dtype


def test_fp32_weights_get_the_runtimes_optimizer_itself():
    cfg = TrainConfig(lr=1e-3, weight_decay=0.2)
    optimizer = build_measure_optimizer(_model(torch.float32), cfg, CPU)
    assert type(optimizer) is torch.optim.AdamW
    reference = build_optimizer([_model(torch.float32)], cfg, CPU)
    assert optimizer.defaults == reference.defaults


def test_bf16_weights_keep_the_runtimes_groups_and_hyper_parameters():
    cfg = TrainConfig(lr=2e-3, weight_decay=0.3, beta1=0.8, beta2=0.9, adam_eps=1e-6)
    model = _model(torch.bfloat16)
    optimizer = build_measure_optimizer(model, cfg, CPU)
    assert isinstance(optimizer, MixedPrecisionAdamW)
    decay, no_decay = optimizer.param_groups
    assert all(p.ndim == 2 for p in decay["params"]) and len(decay["params"]) == 2
    assert all(p.ndim == 1 for p in no_decay["params"]) and len(no_decay["params"]) == 4
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.3, 0.0)
    assert decay["betas"] == (0.8, 0.9) and decay["eps"] == 1e-6
    assert all(t.dtype == torch.float32 for t in optimizer.state_tensors())
    scheduler = build_lr_scheduler(optimizer, cfg)  # the runtime's LR schedule drives it
    assert decay["lr"] == cfg.lr / cfg.warmup_steps
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    before = [state["master"].clone() for state in optimizer.state.values()]
    optimizer.step()
    scheduler.step()
    assert decay["lr"] == 2 * cfg.lr / cfg.warmup_steps
    # Adam's first step moves every fp32 master weight by lr against the gradient's sign
    # (an update this small can round away in the bf16 weights: the masters keep it)
    after = [state["master"] for state in optimizer.state.values()]
    for old, new, group in zip(before, after, [decay] * 2 + [no_decay] * 4, strict=True):
        lr = cfg.lr / cfg.warmup_steps
        expected = old * (1 - lr * group["weight_decay"]) - lr
        assert torch.allclose(new, expected, rtol=0, atol=1e-3 * lr)
