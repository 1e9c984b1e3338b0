"""The DeepSpeed backend (layout.zero_backend = "deepspeed"; data parallel only: tp=pp=sp=1).

The plan's per-layer activation policies (offload/) go on the layers before DeepSpeed wraps
the model, as parallelize() does for FSDP2. Under ZeRO-3, offload, token-wise and selective
recomputation run (with DeepSpeed's memory_efficient_linear off); full-layer recomputation is
refused by ParallelDims.check_plan: DeepSpeed releases the parameters the recomputed layer
needs in backward.

deepspeed.initialize with the config planner/deepspeed_config.py builds (the one
`memplan export export.format=deepspeed` writes): zero_optimization.stage =
layout.zero_stage (0-3), the trainer's AdamW (framework.components.optim: torch's
implementation, so no DeepSpeed op is compiled) and LR schedule,
gradient_accumulation_steps = num_microbatches (engine.backward divides each micro-batch
loss by it, so gradients are those of the rows' mean), gradient_clipping = train.grad_clip
(DeepSpeed's coefficient max_norm / (norm + 1e-6) is torch's), bf16 on GPU.
With ZeRO-0 in fp32 DeepSpeed does not report the gradient norm, so this runtime clips
(torch's clip_grad_norm_ on the all-reduced gradients) and DeepSpeed's clipping is off.

Checkpoints (stateful_parts) use the same FQN keys as the FSDP2 layouts:
- "model": each parameter's full fp32 value (ZeRO-1/2/3: DeepSpeed's fp32 master copy,
  assembled with deepspeed.utils.safe_get_full_fp32_param; ZeRO-0: the parameter);
- "optimizer": `state.<fqn>.exp_avg|exp_avg_sq|step` and `param_groups.<fqn>.<key>`, the
  flattened torch layout (ZeRO-1/2/3 through safe_get_full_optimizer_state);
- "lr_scheduler": the schedule position.
So a DeepSpeed checkpoint loads into an FSDP2 layout and back. Every rank materialises full
tensors while saving (a collective per parameter): simple, and as large as one unsharded
copy of the model states per rank.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.stateful import Stateful

from configs.schema import ModelConfig, TrainConfig
from framework.components.evaluation import EvalSums, ValidationSet, summed_loss
from framework.components.logs import adopt_library_logger
from framework.components.optim import build_lr_scheduler, build_optimizer
from framework.components.weights import initialize_weights
from framework.runtime.base import StepOutput
from framework.runtime.state import SchedulerState
from framework.runtime.step import (
    accumulate_microbatches,
    forward_only,
    run_evaluation,
    run_train_step,
)
from offload import ActivationRuntime, apply_layer_policies, reserve_plan_host_memory
from parallel.stage_model import StageModel
from planner.deepspeed_config import deepspeed_config
from planner.plan import Plan


class LossModule(nn.Module):
    """forward(tokens, targets) -> mean loss: DeepSpeed engines wrap a module whose forward
    is the whole micro-batch computation (ZeRO-3 gathers parameters per module forward)."""

    def __init__(self, model: StageModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, targets: Tensor, summed: bool = False) -> Tensor:
        hidden = self.model(tokens)
        if summed:  # validation: [summed cross-entropy, tokens] of the real rows (CPU targets)
            return summed_loss(self.model.loss, hidden, targets)
        return self.model.loss(hidden, targets)


class DeepSpeedRuntime:
    """One DeepSpeed engine over all ranks (dp = world size)."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        plan: Plan,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        if device.type == "cpu":  # said, not detected: DeepSpeed warns when it detects a CPU
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        adopt_library_logger("DeepSpeed")  # its lines to the rank log, not its own stdout handler
        if device.type == "cpu":  # skip compiling the shared-memory op DeepSpeed wants on CPU
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        layout = plan.layout
        self.device = device
        self.dp_rank, self.dp_size = dist.get_rank(), dist.get_world_size()
        self.micro_batch_size = layout.micro_batch_size
        self.num_microbatches = layout.num_microbatches
        self.zero_stage = layout.zero_stage
        self.grad_clip = train_cfg.grad_clip
        self.pre_update_hooks: list[Callable[[], None]] = []
        # ZeRO-0 in fp32 uses the plain optimizer, which does not report the norm: clip here.
        self.clip_here = layout.zero_stage == 0 and dtype == torch.float32

        # An earlier ZeRO-3 engine in this process may have left its linear in place.
        restore_torch_linear()
        model = StageModel(model_cfg, loss_chunk_tokens=train_cfg.loss_chunk_tokens).to(device)
        initialize_weights(model, model_cfg, train_cfg.seed)
        self.activation_runtime = ActivationRuntime(fetch=plan.layout.activation_fetch)
        apply_layer_policies(model.layers.values(), plan.layers, self.activation_runtime)
        # one micro-batch in flight: one host slab per offloading layer, allocated now
        slabs = {int(name): 1 for name in model.layers}
        reserve_plan_host_memory(self.activation_runtime, device, model_cfg, plan, slabs)
        module = LossModule(model)
        if layout.zero_stage == 3:
            # The loss reads the output weight outside its module's forward.
            deepspeed.zero.register_external_parameter(module, model.output_weight())
        # offloaded optimizer state: the step runs on the host's fp32 partitions
        offloaded = layout.state_offload == "optimizer"
        optimizer = build_optimizer(
            [model], train_cfg, torch.device("cpu") if offloaded else device
        )
        self.scheduler = build_lr_scheduler(optimizer, train_cfg)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            lr_scheduler=self.scheduler,
            config=self._config(plan, train_cfg, dtype, device),
        )
        self.model = model
        self.names = {id(p): name for name, p in model.named_parameters()}

    def _config(
        self, plan: Plan, train_cfg: TrainConfig, dtype: torch.dtype, device: torch.device
    ) -> dict[str, Any]:
        """planner/deepspeed_config.py's config; host memory is pinned only beside a GPU."""
        config = deepspeed_config(
            plan, train_cfg.grad_clip, dtype == torch.bfloat16, not self.clip_here
        )
        offload = config["zero_optimization"].get("offload_optimizer")
        if offload is not None and device.type != "cuda":
            offload["pin_memory"] = False
        return config

    def train_step(self, inputs: Tensor, targets: Tensor) -> StepOutput:
        return run_train_step(self, self.pre_update_hooks, inputs, targets)

    # -- the phases of run_train_step ----------------------------------------------------

    def _backward(self, loss: Tensor, is_last: bool) -> None:
        self.engine.backward(loss)  # divides by gradient_accumulation_steps
        if not is_last:
            self.engine.step()  # before the boundary: DeepSpeed only counts micro-steps

    def forward_backward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        return accumulate_microbatches(
            self.engine, inputs, targets, self.micro_batch_size, self.device, self._backward
        )

    def finish_gradients(self) -> Tensor | None:
        """ZeRO-0 fp32 clips here (the boundary backward all-reduced the gradients); every
        other stage clips inside the engine's step, which reports the norm afterwards."""
        if not self.clip_here:
            return None
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        return nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def update(self) -> Tensor | None:
        self.engine.step()  # the boundary: the optimizer and schedule step
        if self.clip_here:
            return None
        return torch.as_tensor(float(self.engine.get_global_grad_norm()))

    def global_loss(self, local_loss: Tensor | None) -> Tensor:
        assert local_loss is not None  # data parallel only: every rank holds the loss
        share = local_loss / self.dp_size
        dist.all_reduce(share)
        return share

    # --------------------------------------------------------------------------------------

    def evaluate(self, validation: ValidationSet) -> EvalSums:
        """Through the engine's forward (ZeRO-3 gathers parameters per module, the output
        weight inside LossModule's forward), this rank's windows, sums all-reduced."""
        batches = validation.batches(self.dp_rank, self.dp_size, self.micro_batch_size)
        with forward_only([self.engine]):
            return run_evaluation(self._micro_sums, batches, self.device, self._reduce_sums)

    def _micro_sums(self, inputs: Tensor, targets: Tensor) -> Tensor:
        return self.engine(inputs.to(self.device, non_blocking=True), targets, summed=True)

    def _reduce_sums(self, total: Tensor) -> None:
        dist.all_reduce(total)

    def stateful_parts(self) -> dict[str, Stateful]:
        return {
            "model": DeepSpeedModelState(self),
            "optimizer": DeepSpeedOptimizerState(self),
            "lr_scheduler": SchedulerState([self.scheduler]),
        }

    def close(self) -> None:
        """Release the engine's optimizer and hooks (the process group stays)."""
        self.activation_runtime.remove()
        self.engine.destroy()
        restore_torch_linear()


def restore_torch_linear() -> None:
    """Undo ZeRO-3's process-wide replacement of torch.nn.functional.linear.

    With memory_efficient_linear on, DeepSpeed swaps F.linear for its own autograd function
    and never swaps it back ("persists unless manually reset"). A later model in the same
    process (another runtime, or one whose token-wise recomputation needs torch's linear)
    would otherwise run DeepSpeed's, which fails in backward on non-ZeRO parameters.
    """
    from deepspeed.runtime.zero.partition_parameters import (
        InsertPostInitMethodToModuleSubClasses as ZeroInit,
    )

    original = getattr(ZeroInit, "linear_bk", None)
    if original is not None:
        torch.nn.functional.linear = original


@torch.no_grad()
def _create_state(optimizer: torch.optim.Optimizer, wrapper: Any) -> None:
    """AdamW steps at lr 0 on zero gradients: create every state tensor (zeros) and change
    no parameter (what torch.distributed.checkpoint does for torch optimizers). ZeRO-3 puts
    each flat fp32 partition into its param group only around its own step; do the same."""
    flats = getattr(wrapper, "fp32_partitioned_groups_flat", None)
    if flats is None:  # ZeRO-0/1/2: the param groups hold the (flat) parameters
        groups = [(group, list(group["params"])) for group in optimizer.param_groups]
    else:
        to_group = wrapper.sub_group_to_group_id
        groups = [(optimizer.param_groups[to_group[i]], [flat]) for i, flat in enumerate(flats)]
    for group, params in groups:
        saved_params, saved_lr = group["params"], group["lr"]
        saved_grads = [p.grad for p in params]
        group["params"], group["lr"] = params, 0.0
        for param in params:
            param.grad = torch.zeros_like(param)
        optimizer.step()
        for param, grad in zip(params, saved_grads, strict=True):
            param.grad = grad
        group["params"], group["lr"] = saved_params, saved_lr


def _param_items(runtime: DeepSpeedRuntime) -> list[tuple[str, nn.Parameter]]:
    return list(runtime.model.named_parameters())


class DeepSpeedModelState(Stateful):
    """Full fp32 parameter values by FQN (collective over the data-parallel ranks)."""

    def __init__(self, runtime: DeepSpeedRuntime) -> None:
        self.runtime = runtime

    def state_dict(self) -> dict[str, Any]:
        from deepspeed.utils import safe_get_full_fp32_param

        state = {}
        for name, param in _param_items(self.runtime):
            if self.runtime.zero_stage == 0 and not hasattr(param, "_hp_mapping"):
                state[name] = param.detach().float().clone()
            else:
                state[name] = safe_get_full_fp32_param(param).detach().clone()
        return state

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param

        for name, param in _param_items(self.runtime):
            if name not in state_dict:
                continue
            value = state_dict[name].to(self.runtime.device)
            safe_set_full_fp32_param(param, value)  # the master copy (no-op without one)
            # ...and the parameter the forward reads (gathered, written, re-partitioned)
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                param.copy_(value.to(param.dtype))


class DeepSpeedOptimizerState(Stateful):
    """AdamW state by FQN in torch's flattened layout (collective under ZeRO-1/2/3)."""

    STATE_KEYS = ("exp_avg", "exp_avg_sq")

    def __init__(self, runtime: DeepSpeedRuntime) -> None:
        self.runtime = runtime

    def _base(self) -> torch.optim.Optimizer:
        """The torch optimizer DeepSpeed steps, its state created if no step ran yet (a
        resume loads into it: ZeRO-3 creates optimizer state lazily)."""
        optimizer = self.runtime.engine.optimizer
        base = getattr(optimizer, "optimizer", optimizer)  # ZeRO wraps the torch optimizer
        if not base.state:
            _create_state(base, optimizer)
        link = getattr(optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:
            # ZeRO-1/2 map each parameter to its state fragments once, right after the first
            # param group's first step: the other groups have no state yet then (DeepSpeed
            # 0.19), so their fragments stay empty. Map again now that every group has one.
            optimizer._hp_optimizer_states_linked = False
            link()
        return base

    def _step(self) -> Tensor:
        for state in self._base().state.values():
            if "step" in state:
                return torch.as_tensor(state["step"], dtype=torch.float32).detach().clone()
        return torch.zeros((), dtype=torch.float32)

    def state_dict(self) -> dict[str, Any]:
        from deepspeed.utils import safe_get_full_optimizer_state

        step = self._step()
        base_groups = self._base().param_groups
        state: dict[str, Any] = {}
        for name, param in _param_items(self.runtime):
            for key in self.STATE_KEYS:
                if self.runtime.zero_stage == 0 and not hasattr(param, "_hp_mapping"):
                    value = self._base().state.get(param, {}).get(key)
                else:
                    value = safe_get_full_optimizer_state(param, key)
                if value is None:
                    value = torch.zeros_like(param, dtype=torch.float32)
                state[f"state.{name}.{key}"] = value.detach().float().clone()
            state[f"state.{name}.step"] = step.clone()
            group = self._group_of(param, base_groups)
            for key, value in group.items():
                if key != "params":
                    state[f"param_groups.{name}.{key}"] = value
        return state

    def _group_of(self, param: nn.Parameter, groups: list[dict[str, Any]]) -> dict[str, Any]:
        # build_optimizer's grouping: weight decay on >= 2-D weights, in that order
        return groups[0] if param.ndim >= 2 else groups[-1]

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        base, device = self._base(), self.runtime.device
        step = None
        for name, param in _param_items(self.runtime):
            if f"state.{name}.step" not in state_dict:
                continue
            step = torch.as_tensor(state_dict[f"state.{name}.step"], dtype=torch.float32)
            values = {key: state_dict[f"state.{name}.{key}"].to(device) for key in self.STATE_KEYS}
            if self.runtime.zero_stage == 0 and not hasattr(param, "_hp_mapping"):
                base.state[param].update({k: v.clone() for k, v in values.items()}, step=step)
            else:
                for key, value in values.items():
                    safe_set_full_optimizer_state(param, value, key)
        if step is not None:  # ZeRO's flat partitions share one step count
            for state in base.state.values():
                state["step"] = step.clone().to(state.get("step", step).device)
        for group in base.param_groups:
            lrs = [
                v
                for k, v in state_dict.items()
                if k.startswith("param_groups.") and k.endswith(".lr")
            ]
            if lrs:
                group["lr"] = lrs[0]
