"""The optimizer of a measured step: the runtime's AdamW, with fp32 master weights and moments
when the weights themselves are bf16.

    build_measure_optimizer(model, train_cfg, device) -> torch.optim.Optimizer

fp32 weights: framework.components.optim.build_optimizer itself (what LocalRuntime and
ParallelRuntime step). bf16 weights (what `memplan profile` runs on CUDA, like FSDP2's
MixedPrecisionPolicy(param_dtype=bf16) compute copies): build_optimizer keeps its moments
in the parameters' dtype, measured 2 (weight) + 2 (grad) + 4 (two bf16 moments) = 8 bytes per
parameter (tests/unit/test_measure_optimizer.py), not the plan's 16 (fp32 master + two fp32
moments: K = 12, planner/params.py). So for bf16 weights the same parameter groups and
hyper-parameters step through MixedPrecisionAdamW, which holds the fp32 master weights and
moments the plan counts (the role FSDP2's fp32 sharded parameters play in the runtime).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from configs.schema import TrainConfig
from framework.components.optim import build_optimizer


class MixedPrecisionAdamW(torch.optim.Optimizer):
    """AdamW on fp32 master weights and moments for low-precision weights and gradients
    (the plan's 2 + 2 + 12 bytes per parameter). The update walks each tensor in chunks of
    CHUNK elements, so the fp32 copy of a gradient never costs more than one chunk."""

    CHUNK = 2**24

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.steps = 0
        for group in self.param_groups:
            for param in group["params"]:
                master = param.detach().float().reshape(-1)
                self.state[param] = {
                    "master": master,
                    "exp_avg": torch.zeros_like(master),
                    "exp_avg_sq": torch.zeros_like(master),
                }

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        self.steps += 1
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group)

    def _update(self, param: nn.Parameter, group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
        correction1 = 1 - beta1**self.steps
        correction2 = 1 - beta2**self.steps
        state = self.state[param]
        grads, weights = param.grad.reshape(-1), param.view(-1)
        master = state["master"]
        for start in range(0, master.numel(), self.CHUNK):
            part = slice(start, start + self.CHUNK)
            grad = grads[part].float()
            w, m, v = master[part], state["exp_avg"][part], state["exp_avg_sq"][part]
            w.mul_(1 - lr * decay)
            m.lerp_(grad, 1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denominator = (v / correction2).sqrt_().add_(eps)
            w.addcdiv_(m, denominator, value=-lr / correction1)
            weights[part].copy_(w)

    def state_tensors(self) -> list[Tensor]:
        return [tensor for state in self.state.values() for tensor in state.values()]


def with_fp32_masters(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """`optimizer` itself when every parameter is fp32; otherwise its parameter groups and
    hyper-parameters on fp32 master weights and moments (MixedPrecisionAdamW, module doc)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if all(p.dtype == torch.float32 for p in params):
        return optimizer
    keys = ("params", "lr", "betas", "eps", "weight_decay")
    groups = [{key: group[key] for key in keys} for group in optimizer.param_groups]
    return MixedPrecisionAdamW(groups)


def build_measure_optimizer(
    model: nn.Module, train_cfg: TrainConfig, device: torch.device
) -> torch.optim.Optimizer:
    """build_optimizer's AdamW, with fp32 masters for bf16 weights (with_fp32_masters)."""
    return with_fp32_masters(build_optimizer([model], train_cfg, device))


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The per-parameter state tensors (Adam's 0-dim step counters are left out)."""
    if isinstance(optimizer, MixedPrecisionAdamW):
        return optimizer.state_tensors()
    return [
        value
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, Tensor) and value.dim() > 0
    ]
