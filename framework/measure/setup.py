"""What `memplan profile` runs for a plan on this machine, and how it relates to the plan.

    profile_setup(cfg, plan, device, scale, seq_len) -> ProfileSetup
    build_stage_model(setup, device, seed) -> StageModel

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
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from configs.errors import ConfigError
from configs.schema import Config, ModelConfig, TrainConfig
from parallel.stage_model import StageModel
from planner.activations import LayerShape, layer_activation_bytes
from planner.flops import layer_matmul_params
from planner.plan import LayerPlan, Plan, check_plan_matches
from planner.schedules import chunk_inflight, rank_stages, stage_rank

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
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimizer, clipping and loss settings of the runtime's step (framework/runtime/step.py)."""

    @property
    def first_stage(self) -> bool:
        return self.stage == 0

    @property
    def last_stage(self) -> bool:
        return self.stage == self.num_stages - 1

    @property
    def dtype_bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


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
    """Micro-batches whose activations global stage `stage` holds at once under the plan's
    schedule: the in-flight count of its local chunk on the pp rank that runs it
    (planner/schedules.py: stage_rank, rank_stages, chunk_inflight)."""
    layout = plan.layout
    if layout.pp == 1:
        return 1
    schedule = layout.pp_schedule
    rank = stage_rank(stage, layout.pp, schedule)
    chunk = rank_stages(rank, layout.pp, layout.virtual_stages, schedule).index(stage)
    in_flight = chunk_inflight(
        schedule, rank, layout.pp, layout.virtual_stages, layout.num_microbatches
    )
    return in_flight[chunk]


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


def _layout_notes(plan: Plan, model: ModelConfig, seq_local: int) -> list[str]:
    """How the plan's layout differs from one process running one stage."""
    layout = plan.layout
    notes = []
    if layout.tp > 1:
        notes.append(f"tp={layout.tp}: per-rank heads {model.num_heads}, ffn {model.ffn_size}")
    if layout.zero_stage > 0 and layout.dp * layout.sp > 1:
        notes.append(
            f"ZeRO-{layout.zero_stage} over {layout.dp * layout.sp} ranks: model states are not "
            "sharded here (one process holds them all)"
        )
    if layout.sp > 1:
        notes.append(
            f"sp={layout.sp}: {seq_local} local tokens; the attention core runs on this rank "
            "(no Ulysses all-to-all copy)"
        )
    return notes


def _scaled_note(model: ModelConfig, small: ModelConfig, seq_local: int, target: int) -> str:
    return (
        f"scaled down: hidden {model.hidden_size}->{small.hidden_size}, heads "
        f"{model.num_heads}->{small.num_heads} (kv {model.num_kv_heads}->"
        f"{small.num_kv_heads}), head_dim {model.resolved_head_dim}->16, ffn "
        f"{model.ffn_size}->{small.ffn_size}, vocab {model.vocab_size}->{small.vocab_size},"
        f" local tokens {seq_local}->{target}; per-layer policies kept"
    )


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
    seq_local = cfg.train.seq_len // layout.sp
    notes = _layout_notes(plan, model, seq_local)
    if scaled:
        small = scale_down(model)
        target = seq_len or min(128, seq_local)
        notes.append(_scaled_note(model, small, seq_local, target))
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
        train=cfg.train,
    )


def whole_model_setup(cfg: Config, dtype: torch.dtype, micro_batch: int = 1) -> ProfileSetup:
    """The whole model of cfg as one stage, no policies: what the benchmarks train."""
    return ProfileSetup(
        model=cfg.model,
        policies=(),
        plan_indices=(),
        stage=0,
        num_stages=1,
        micro_batch=micro_batch,
        seq_local=cfg.train.seq_len,
        dtype=dtype,
        scaled=False,
        notes=(),
        train=cfg.train,
    )


def build_stage_model(setup: ProfileSetup, device: torch.device, seed: int) -> StageModel:
    """The stage's model on `device` in setup.dtype: parallel.stage_model.StageModel (the
    runtime's stage, without the modules of other stages), built on meta, materialised
    with the single-process initial weights."""
    with torch.device("meta"):
        model = StageModel(
            setup.model, setup.stage, setup.num_stages, None, setup.train.loss_chunk_tokens
        )
    model.to_empty(device=device)
    model.init_weights(seed)
    model.to(setup.dtype)
    model.rope_inv_freq = model.rope_inv_freq.float()  # RoPE frequencies stay fp32
    return model
