"""Run real training steps of a plan on this machine and compare memory with its predictions.

What is built (`profile_setup`):
- the most loaded pipeline stage only (largest predicted in-flight activations + states),
  with its layers' policies; a stage that is not first gets random hidden states as input
  (no embedding), one that is not last gets a random output gradient (no head);
- per-rank widths: heads, kv heads and ffn divided by tp; seq_len / sp local tokens (the
  attention core runs on one rank here, so Ulysses' all-to-all copy is not reproduced);
- on CUDA the plan's dims in its dtype (bf16 weights and activations, fp32 master weights
  and Adam moments: 16 bytes per parameter as the plan counts them); on the CPU (or with
  profile.scale=small) a scaled-down model: at most 8 query heads (kv heads in the same
  ratio) of head_dim 16, hidden and ffn scaled with them, vocab <= 512, profile.seq_len
  local tokens, fp32; the per-layer policies (fractions) stay as planned.
Predictions come from planner.activations for exactly the shapes that run, so predicted and
measured bytes are comparable layer by layer. Measured (`run_profile`): per layer, the bytes
the offload engine holds on the device and on the host and the bytes it dropped for
recomputation; the step peak (CUDA: torch.cuda.max_memory_allocated; CPU: the saved bytes
measured in and outside the layers plus the model states' tensors) and the step time.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from configs.errors import ConfigError
from configs.schema import Config, ModelConfig
from framework.components.loss import chunked_cross_entropy
from framework.components.model import Transformer, build_model, count_parameters, materialize
from framework.measure.saved_bytes import OUTSIDE, SavedTensorLedger
from offload import ActivationRuntime, LayerActivationStats, apply_activation_plan
from planner.activations import (
    LayerActivationBytes,
    LayerShape,
    layer_activation_bytes,
    outside_layers_bytes,
)
from planner.flops import layer_matmul_params
from planner.plan import LayerPlan, Plan, check_plan_matches

logger = logging.getLogger(__name__)

STATE_BYTES_PER_PARAM = 16
"""fp32 training: weight 4 + grad 4 + Adam moments 8; bf16 mixed precision: weight 2 +
grad 2 + fp32 master 4 + moments 8. The same 16 either way."""


@dataclass(frozen=True)
class ProfileSetup:
    """What runs on this machine, and how it relates to the plan."""

    model: ModelConfig
    """The model built here: one stage's layers, per-rank (and possibly scaled) widths."""
    policies: tuple[LayerPlan, ...]
    """The stage's layer policies, re-indexed 0..n-1 for the model built here."""
    plan_indices: tuple[int, ...]
    """The plan's index of each layer built here."""
    stage: int
    num_stages: int
    micro_batch: int
    seq_local: int
    dtype: torch.dtype
    scaled: bool
    notes: tuple[str, ...]
    """Human-readable differences between the plan and this run."""

    @property
    def first_stage(self) -> bool:
        return self.stage == 0

    @property
    def last_stage(self) -> bool:
        return self.stage == self.num_stages - 1

    @property
    def dtype_bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class LayerRow:
    """Predicted vs measured saved-activation bytes of one layer (one micro-batch)."""

    index: int
    policy: LayerPlan
    predicted: LayerActivationBytes
    measured: LayerActivationStats


@dataclass
class ProfileReport:
    """Everything `memplan profile` prints (and writes as JSON)."""

    setup: ProfileSetup
    device: str
    rows: list[LayerRow]
    peak_measured_bytes: int
    peak_predicted_bytes: int
    """Model states + saved activations predicted for exactly what ran."""
    plan_peak_bytes: int
    """The plan's gpu_peak_bytes (for the plan's real dims and layout)."""
    activation_measured_bytes: int
    state_measured_bytes: int
    step_seconds: list[float]
    host_slab_allocations: int
    host_slab_allocations_after_first_step: int
    baseline_step_seconds: list[float] = field(default_factory=list)
    baseline_peak_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        setup = self.setup
        return {
            "device": self.device,
            "model": dataclasses.asdict(setup.model),
            "stage": setup.stage,
            "num_stages": setup.num_stages,
            "micro_batch": setup.micro_batch,
            "seq_local": setup.seq_local,
            "dtype": str(setup.dtype).removeprefix("torch."),
            "scaled": setup.scaled,
            "notes": list(setup.notes),
            "layers": [
                {
                    "index": row.index,
                    "policy": dataclasses.asdict(row.policy) | {"index": row.index},
                    "predicted": dataclasses.asdict(row.predicted),
                    "measured": dataclasses.asdict(row.measured),
                }
                for row in self.rows
            ],
            "peak": {
                "measured_bytes": self.peak_measured_bytes,
                "predicted_bytes": self.peak_predicted_bytes,
                "plan_gpu_peak_bytes": self.plan_peak_bytes,
                "activation_measured_bytes": self.activation_measured_bytes,
                "state_measured_bytes": self.state_measured_bytes,
            },
            "step_seconds": self.step_seconds,
            "host_slab_allocations": self.host_slab_allocations,
            "host_slab_allocations_after_first_step": self.host_slab_allocations_after_first_step,
            "baseline": {
                "step_seconds": self.baseline_step_seconds,
                "peak_bytes": self.baseline_peak_bytes,
            },
        }


def per_rank_model(model: ModelConfig, tp: int) -> ModelConfig:
    """The widths one tensor-parallel rank holds, as a single-rank model."""
    if tp == 1:
        return model
    for key in ("num_heads", "ffn_size"):
        if getattr(model, key) % tp:
            raise ConfigError(
                "plan.path", f"model.{key}={getattr(model, key)} not divisible by tp={tp}"
            )
    return dataclasses.replace(
        model,
        num_heads=model.num_heads // tp,
        num_kv_heads=max(model.num_kv_heads // tp, 1),
        ffn_size=model.ffn_size // tp,
        head_dim=model.resolved_head_dim,
    )


def scale_down(
    model: ModelConfig, max_q_heads: int = 8, head_dim: int = 16, max_vocab: int = 512
) -> ModelConfig:
    """A small model of the same shape: GQA group size, hidden : heads x head_dim and
    ffn : hidden ratios kept; at most max_q_heads query heads of `head_dim`."""
    group = model.num_heads // model.num_kv_heads
    kv_heads = max(1, min(model.num_kv_heads, max_q_heads // group))
    q_heads = kv_heads * group
    width = model.hidden_size / (model.num_heads * model.resolved_head_dim)
    hidden = max(8, round(q_heads * head_dim * width / 8) * 8)
    ffn = max(8, round(model.ffn_size * hidden / model.hidden_size / 8) * 8)
    return dataclasses.replace(
        model,
        hidden_size=hidden,
        num_heads=q_heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        ffn_size=ffn,
        vocab_size=min(model.vocab_size, max_vocab),
    )


def stage_in_flight(stage: int, plan: Plan) -> int:
    """Micro-batches whose activations a stage holds at once (GPipe: all; 1F1B family: the
    warm-up depth of its rank)."""
    layout = plan.layout
    if layout.pp == 1:
        return 1
    if layout.pp_schedule == "gpipe":
        return layout.num_microbatches
    rank = stage % layout.pp
    return min(layout.num_microbatches, layout.num_stages - rank)


def most_loaded_stage(plan: Plan, model: ModelConfig) -> int:
    """The stage with the largest predicted in-flight saved activations + layer states."""
    shape = LayerShape.of(per_rank_model(model, plan.layout.tp), _plan_dtype_bytes(plan))
    seq_local = plan.train.seq_len // plan.layout.sp
    layer_params = layer_matmul_params(model)
    loads: dict[int, float] = {}
    for policy in plan.layers:
        device = layer_activation_bytes(
            shape, plan.layout.micro_batch_size, seq_local, policy
        ).device_bytes
        loads[policy.stage] = loads.get(policy.stage, 0.0) + (
            stage_in_flight(policy.stage, plan) * device
            + STATE_BYTES_PER_PARAM * layer_params / plan.layout.tp
        )
    return max(sorted(loads), key=lambda stage: loads[stage])


def _plan_dtype_bytes(plan: Plan) -> int:
    return 2 if plan.train.dtype == "bf16" else 4


def profile_setup(
    cfg: Config,
    plan: Plan,
    device: torch.device,
    scale: str = "auto",
    seq_len: int | None = None,
) -> ProfileSetup:
    """Check the plan against the config (ConfigError if it does not fit) and decide what
    runs here (see the module docstring). scale: auto (CPU: small, CUDA: full) | full | small."""
    check_plan_matches(plan, cfg.model, cfg.cluster, cfg.train)
    layout = plan.layout
    if cfg.train.seq_len % layout.sp:
        raise ConfigError("plan.path", f"train.seq_len={cfg.train.seq_len} not divisible by sp")
    scaled = scale == "small" or (scale == "auto" and device.type != "cuda")
    stage = most_loaded_stage(plan, cfg.model)
    stage_policies = [p for p in plan.layers if p.stage == stage]
    model = per_rank_model(cfg.model, layout.tp)
    notes = []
    if layout.tp > 1:
        notes.append(f"tp={layout.tp}: per-rank heads {model.num_heads}, ffn {model.ffn_size}")
    if layout.zero_stage > 0 and layout.dp * layout.sp > 1:
        notes.append(
            f"ZeRO-{layout.zero_stage} over {layout.dp * layout.sp} ranks: model states are not "
            "sharded here (one process holds them all)"
        )
    seq_local = cfg.train.seq_len // layout.sp
    if layout.sp > 1:
        notes.append(
            f"sp={layout.sp}: {seq_local} local tokens; the attention core runs on this rank "
            "(no Ulysses all-to-all copy)"
        )
    if scaled:
        small = scale_down(model)
        target = seq_len or min(128, seq_local)
        notes.append(
            f"scaled down: hidden {model.hidden_size}->{small.hidden_size}, heads "
            f"{model.num_heads}->{small.num_heads} (kv {model.num_kv_heads}->"
            f"{small.num_kv_heads}), head_dim {model.resolved_head_dim}->16, ffn "
            f"{model.ffn_size}->{small.ffn_size}, vocab {model.vocab_size}->{small.vocab_size},"
            f" local tokens {seq_local}->{target}; per-layer policies kept"
        )
        model, seq_local = small, target
    dtype = torch.float32 if scaled or plan.train.dtype == "fp32" else torch.bfloat16
    if scaled and plan.train.dtype == "bf16":
        notes.append("dtype bf16->fp32")
    if layout.pp > 1:
        notes.append(
            f"stage {stage} of {layout.num_stages} (most loaded): layers "
            f"{stage_policies[0].index}-{stage_policies[-1].index}, one micro-batch per step"
        )
    tie = model.tie_embeddings and stage == 0
    model = dataclasses.replace(model, num_layers=len(stage_policies), tie_embeddings=tie)
    policies = tuple(dataclasses.replace(p, index=i) for i, p in enumerate(stage_policies))
    return ProfileSetup(
        model=model,
        policies=policies,
        plan_indices=tuple(p.index for p in stage_policies),
        stage=stage,
        num_stages=layout.num_stages,
        micro_batch=layout.micro_batch_size,
        seq_local=seq_local,
        dtype=dtype,
        scaled=scaled,
        notes=tuple(notes),
    )


def build_stage_model(setup: ProfileSetup, device: torch.device, seed: int) -> Transformer:
    """The stage's model on `device` in setup.dtype (modules of other stages removed)."""
    model = materialize(build_model(setup.model), device, seed)
    if not setup.first_stage:
        model.tok_embeddings = None
    if not setup.last_stage:
        model.norm, model.output = None, None
    model.to(setup.dtype)
    model.rope_inv_freq = model.rope_inv_freq.float()  # RoPE frequencies stay fp32
    return model


class MixedPrecisionAdamW:
    """AdamW on fp32 master weights and moments for low-precision weights and gradients
    (the plan's 2 + 2 + 12 bytes per parameter). The update walks each tensor in chunks of
    CHUNK elements, so the fp32 copy of a gradient never costs more than one chunk."""

    CHUNK = 2**24

    def __init__(
        self,
        params: list[nn.Parameter],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        self.params = params
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.masters = [p.detach().float().reshape(-1) for p in params]
        self.exp_avg = [torch.zeros_like(m) for m in self.masters]
        self.exp_avg_sq = [torch.zeros_like(m) for m in self.masters]
        self.steps = 0

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        beta1, beta2 = self.betas
        correction1 = 1 - beta1**self.steps
        correction2 = 1 - beta2**self.steps
        for index, param in enumerate(self.params):
            if param.grad is None:
                continue
            grads, weights = param.grad.reshape(-1), param.view(-1)
            master = self.masters[index]
            for start in range(0, master.numel(), self.CHUNK):
                part = slice(start, start + self.CHUNK)
                grad = grads[part].float()
                w, m, v = master[part], self.exp_avg[index][part], self.exp_avg_sq[index][part]
                w.mul_(1 - self.lr * self.weight_decay)
                m.lerp_(grad, 1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denominator = (v / correction2).sqrt_().add_(self.eps)
                w.addcdiv_(m, denominator, value=-self.lr / correction1)
                weights[part].copy_(w)

    def state_tensors(self) -> list[Tensor]:
        return [*self.masters, *self.exp_avg, *self.exp_avg_sq]


def _optimizer_state_tensors(optimizer: Any) -> list[Tensor]:
    if isinstance(optimizer, MixedPrecisionAdamW):
        return optimizer.state_tensors()
    return [v for state in optimizer.state.values() for v in state.values() if _is_state(v)]


def _is_state(value: Any) -> bool:
    """A per-parameter optimizer tensor (Adam's 0-dim step counters are left out)."""
    return isinstance(value, Tensor) and value.dim() > 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _StageStep:
    """One micro-batch forward/backward + optimizer step of the stage model."""

    def __init__(self, setup: ProfileSetup, model: Transformer, device: torch.device, seed: int):
        self.setup, self.model, self.device = setup, model, device
        generator = torch.Generator().manual_seed(seed)
        shape = (setup.micro_batch, setup.seq_local)
        vocab = setup.model.vocab_size
        self.tokens = torch.randint(0, vocab, shape, generator=generator).to(device)
        self.targets = torch.randint(0, vocab, shape, generator=generator).to(device)
        hidden = (*shape, setup.model.hidden_size)
        self.hidden_in = torch.randn(hidden, generator=generator).to(device, setup.dtype)
        self.grad_out = torch.randn(hidden, generator=generator).to(device, setup.dtype) * 1e-3
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer: Any = (
            torch.optim.AdamW(params, lr=1e-4)
            if setup.dtype == torch.float32
            else MixedPrecisionAdamW(params, lr=1e-4)
        )
        self.saved_outside_bytes = 0

    def __call__(self) -> None:
        setup, model = self.setup, self.model
        # a later stage receives hidden states that require grad (the previous stage's output)
        inputs = self.tokens if setup.first_stage else self.hidden_in.detach().requires_grad_()
        with SavedTensorLedger(model) as ledger:
            hidden = model(inputs)
            if setup.last_stage:
                loss = chunked_cross_entropy(hidden, model.output_weight(), self.targets, 4096)
        self.saved_outside_bytes = ledger.per_layer_bytes().get(OUTSIDE, 0)
        self.saved_outside_bytes += ledger.shared_bytes()
        del ledger
        if setup.last_stage:
            loss.backward()
        else:
            hidden.backward(self.grad_out)
        self.grad_bytes = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
        self.optimizer.step()
        for param in model.parameters():
            param.grad = None


def run_profile(
    setup: ProfileSetup,
    plan: Plan,
    device: torch.device,
    steps: int,
    seed: int = 0,
    baseline: bool = False,
) -> ProfileReport:
    """Run `steps` steps with the plan's policies (and, with baseline, again without them)."""
    model = build_stage_model(setup, device, seed)
    runtime: ActivationRuntime = apply_activation_plan(model.layers.values(), setup.policies)
    step = _StageStep(setup, model, device, seed)
    times, peak, allocations_after_first = _timed_steps(step, device, steps, runtime)
    layer_stats = runtime.layer_stats()
    activations = (
        sum(stats.device_bytes for stats in layer_stats.values())
        + step.saved_outside_bytes
        + runtime.shared_bytes()
    )
    params_bytes = sum(p.nbytes for p in model.parameters())
    optimizer_bytes = sum(t.nbytes for t in _optimizer_state_tensors(step.optimizer))
    states = params_bytes + step.grad_bytes + optimizer_bytes
    measured_peak = peak if device.type == "cuda" else activations + states
    rows = predicted_rows(setup, layer_stats)
    predicted_peak = predicted_peak_bytes(setup, model, [row.predicted for row in rows])
    report = ProfileReport(
        setup=setup,
        device=str(device),
        rows=rows,
        peak_measured_bytes=measured_peak,
        peak_predicted_bytes=predicted_peak,
        plan_peak_bytes=plan.memory.gpu_peak_bytes,
        activation_measured_bytes=activations,
        state_measured_bytes=states,
        step_seconds=times,
        host_slab_allocations=runtime.pool.allocations if runtime.pool else 0,
        host_slab_allocations_after_first_step=allocations_after_first,
    )
    if baseline:
        runtime.remove()
        times, peak, _ = _timed_steps(step, device, steps, None)
        report.baseline_step_seconds = times
        report.baseline_peak_bytes = peak if device.type == "cuda" else None
    return report


def _timed_steps(
    step: _StageStep, device: torch.device, steps: int, runtime: ActivationRuntime | None
) -> tuple[list[float], int, int]:
    """Seconds per step, the CUDA peak over the steps after the first (all if only one),
    and host slabs allocated after the first step."""
    times = []
    after_first = 0
    for index in range(steps):
        if device.type == "cuda" and index == min(1, steps - 1):
            torch.cuda.reset_peak_memory_stats(device)
        allocations = runtime.pool.allocations if runtime and runtime.pool else 0
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
        if index > 0 and runtime is not None and runtime.pool is not None:
            after_first += runtime.pool.allocations - allocations
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return times, peak, after_first


def predicted_rows(
    setup: ProfileSetup, measured: dict[int, LayerActivationStats]
) -> list[LayerRow]:
    """The planner's prediction for each layer that ran, beside what was measured."""
    shape = LayerShape.of(setup.model, setup.dtype_bytes)
    rows = []
    for policy, plan_index in zip(setup.policies, setup.plan_indices, strict=True):
        predicted = layer_activation_bytes(shape, setup.micro_batch, setup.seq_local, policy)
        rows.append(LayerRow(plan_index, policy, predicted, measured[policy.index]))
    return rows


def predicted_peak_bytes(
    setup: ProfileSetup, model: Transformer, layers: list[LayerActivationBytes]
) -> int:
    """Model states (16 bytes per parameter) + the saved activations at the end of forward,
    predicted for the model that ran."""
    outside = outside_layers_bytes(
        setup.model,
        setup.micro_batch,
        setup.seq_local,
        setup.dtype_bytes,
        first_stage=setup.first_stage,
        last_stage=setup.last_stage,
    )
    states = STATE_BYTES_PER_PARAM * count_parameters(model)
    return states + outside + sum(layer.device_bytes for layer in layers)


def relative_error(measured: int, predicted: int) -> float | None:
    """(measured - predicted) / predicted; None when nothing was predicted."""
    if predicted == 0:
        return None if measured == 0 else float("inf")
    return (measured - predicted) / predicted


def median_step_seconds(times: list[float]) -> float:
    """Median step time, leaving out the first (warm-up) step when there are others."""
    return statistics.median(times[1:] if len(times) > 1 else times)
