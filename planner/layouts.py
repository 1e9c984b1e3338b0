"""Which layouts the runtime can execute, and the enumeration the plan search walks.

Rules (every emitted plan satisfies all of them; `layout_problems` names every broken one,
and the runtime checks the same rules through these functions: parallel/dims.py):
- world: dp x tp x pp x sp = cluster.num_nodes x cluster.gpus_per_node exactly.
- tp <= gpus_per_node; tp divides num_heads, num_kv_heads and ffn_size.
- sp divides num_heads / tp and train.seq_len; with k = num_kv_heads / tp kv heads per tp
  rank, k % sp == 0 or sp % k == 0 (Ulysses splits the kv heads, or replicates them).
- pp x virtual_stages <= num_layers (every stage holds at least one layer).
- global_batch_size = dp x micro_batch_size x num_microbatches (train.micro_batch_size is
  respected when set).
- pp = 1 iff pp_schedule = "none"; pp > 1 needs num_microbatches >= pp.
- gpipe and 1f1b use virtual_stages = 1; interleaved_1f1b and interleaved_zero_bubble use
  virtual_stages >= 2; zbv_zero_bubble uses exactly 2; the three multi-stage schedules need
  num_microbatches to be a multiple of pp.
- zero_backend "deepspeed" only with tp = pp = sp = 1; otherwise "fsdp2".
- a plan's layers: no full recomputation under DeepSpeed ZeRO-3 (plan_problems).
- state_offload "all" (model states in host memory) only with zero_backend "fsdp2" at
  ZeRO-2/3 (FSDP2's CPUOffloadPolicy), "optimizer" only with "deepspeed" at ZeRO-2/3
  (offload_optimizer); the search proposes them beside every such layout when
  planner.state_offload allows (state_offload_enabled).
The search proposes, in addition: in bf16 with zero_backend "fsdp2", ZeRO-2/3 only (one
rank: ZeRO-3, FSDP2 on a one-rank mesh). FSDP2 computes in bf16 from fp32 shards, which is
the planner's accounting (2 + 2 + 12 bytes of states per parameter, bf16 activations); the
torch ZeRO-0/1 path keeps fp32 weights under bf16 autocast, which saves 2x the bytes per layer
(fp32 residual stream and norms, a bf16 copy of every weight; bench/estimator_accuracy.py)
and 4 + 4 bytes of weights and gradients per parameter. DeepSpeed's ZeRO-0/1 are real mixed
precision (bf16 weights, fp32 master copies) and stay.
Mesh order (what the cost model assumes about which groups share a node): (pp, dp, sp, tp),
tp innermost; ZeRO shards over the dp x sp ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from configs.errors import ConfigError
from configs.schema import ClusterConfig, ModelConfig, PlannerConfig, TrainConfig
from planner.costs import training_dtype
from planner.modes import full_recompute_runs
from planner.plan import Layout, Plan
from planner.schedules import INTERLEAVED, MULTI_STAGE, SINGLE_STAGE


@dataclass(frozen=True)
class Problem:
    """One broken rule. `key` names the setting at fault and `message` says what is wrong
    with it (the ConfigError the runtime raises: parallel/dims.py); `text` says both in one
    phrase (the planner's list, layout_problems), where it differs from `message`."""

    key: str
    message: str
    text: str = ""

    def __str__(self) -> str:
        return self.text or self.message

    def error(self) -> ConfigError:
        return ConfigError(self.key, self.message)


def raise_first(problems: list[Problem]) -> None:
    """Raise the ConfigError of the first problem, if any."""
    if problems:
        raise problems[0].error()


def divisors(n: int, most: int | None = None) -> list[int]:
    """Positive divisors of n (only those <= `most` when given), ascending. Trial division
    up to sqrt(n), or up to `most`: a global batch of 10^12 costs 10^6 steps, not 10^12."""
    if most is not None and most * most < n:
        return [d for d in range(1, most + 1) if n % d == 0]
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    large = [n // d for d in reversed(small) if d * d != n]
    return [d for d in small + large if most is None or d <= most]


def world_problems(
    dp: int, tp: int, pp: int, sp: int, world_size: int, world: str
) -> list[Problem]:
    """dp x tp x pp x sp = `world_size` exactly (`world` names where that number comes from)."""
    product = dp * tp * pp * sp
    if product == world_size:
        return []
    return [Problem("layout", f"dp*tp*pp*sp={dp}*{tp}*{pp}*{sp}={product} != {world}={world_size}")]


def model_problems(model: ModelConfig, tp: int, sp: int, seq_len: int) -> list[Problem]:
    """Head, kv-head, FFN and sequence divisibility for tensor and Ulysses parallelism."""
    problems = [
        Problem("layout.tp", f"model.{key}={getattr(model, key)} not divisible by tp={tp}")
        for key in ("num_heads", "num_kv_heads", "ffn_size")
        if getattr(model, key) % tp
    ]
    if not problems:
        heads, kv = model.num_heads // tp, model.num_kv_heads // tp
        if heads % sp:
            problems.append(Problem("layout.sp", f"num_heads/tp={heads} not divisible by sp={sp}"))
        if kv % sp and sp % kv:
            problems.append(
                Problem(
                    "layout.sp",
                    f"num_kv_heads/tp={kv} and sp={sp}: neither divides the other (Ulysses "
                    "splits the kv heads or replicates them)",
                )
            )
    if seq_len % sp:
        problems.append(Problem("layout.sp", f"train.seq_len={seq_len} not divisible by sp={sp}"))
    return problems


def batch_problems(layout: Layout, global_batch_size: int) -> list[Problem]:
    """global_batch_size = dp x micro_batch_size x num_microbatches."""
    dp, micro, g = layout.dp, layout.micro_batch_size, layout.num_microbatches
    if dp * micro * g == global_batch_size:
        return []
    return [
        Problem(
            "layout",
            f"dp*micro_batch_size*num_microbatches={dp}*{micro}*{g} != "
            f"global_batch_size={global_batch_size}",
        )
    ]


VIRTUAL_STAGES = {
    "none": ("=", 1),
    **{schedule: ("=", 1) for schedule in SINGLE_STAGE},
    **{schedule: (">=", 2) for schedule in INTERLEAVED},
    "zbv_zero_bubble": ("=", 2),
}
"""virtual_stages each pipeline schedule runs: (relation, number)."""


def schedule_problems(layout: Layout) -> list[Problem]:
    """Micro-batches per pp rank, virtual stages per schedule (VIRTUAL_STAGES), and the
    multi-stage schedules' micro-batch multiple."""
    pp, g, v = layout.pp, layout.num_microbatches, layout.virtual_stages
    schedule = layout.pp_schedule
    problems = []
    if pp > 1 and g < pp:
        problems.append(
            Problem("layout.num_microbatches", f"{g} < pp={pp}", f"num_microbatches={g} < pp={pp}")
        )
    relation, need = VIRTUAL_STAGES[schedule]
    if not (v >= need if relation == ">=" else v == need):
        wanted = f"{need}" if relation == "=" else f"{relation} {need}"
        problems.append(
            Problem(
                "layout.virtual_stages",
                f"pp_schedule={schedule} needs {wanted}, got {v}",
                f"pp_schedule={schedule} needs virtual_stages{relation}{need}, got {v}",
            )
        )
    if schedule in MULTI_STAGE and g % pp:
        problems.append(
            Problem(
                "layout.num_microbatches",
                f"pp_schedule={schedule} needs num_microbatches={g} divisible by pp={pp}",
            )
        )
    return problems


def backend_problems(layout: Layout) -> list[Problem]:
    """zero_backend "deepspeed" only with tp = pp = sp = 1; state_offload "all" only with
    FSDP2 at ZeRO-2/3."""
    tp, pp, sp = layout.tp, layout.pp, layout.sp
    problems = []
    offload = layout.state_offload
    runs_on = STATE_OFFLOAD_BACKEND.get(offload)
    if (
        offload == "optimizer"
        and layout.zero_backend == "deepspeed"
        and layout.zero_stage == 2
        and layout.num_microbatches > 1
    ):
        message = (
            "optimizer at ZeRO-2 with num_microbatches="
            f"{layout.num_microbatches}: DeepSpeed then accumulates every gradient in a"
            " pinned full-size host buffer, which memplan does not count; use one"
            " micro-batch per step or ZeRO-3"
        )
        problems.append(Problem("layout.state_offload", message, f"state_offload={message}"))
    if runs_on and not (layout.zero_backend == runs_on and layout.zero_stage >= 2):
        how = "FSDP2's CPUOffloadPolicy" if runs_on == "fsdp2" else "DeepSpeed's offload_optimizer"
        message = (
            f"{offload} runs under zero_backend={runs_on} with zero_stage 2 or 3 ({how}), not"
            f" {layout.zero_backend} ZeRO-{layout.zero_stage}"
        )
        problems.append(Problem("layout.state_offload", message, f"state_offload={message}"))
    if layout.zero_backend != "deepspeed" or (tp, pp, sp) == (1, 1, 1):
        return problems
    message = f"deepspeed needs tp=pp=sp=1, got tp={tp} pp={pp} sp={sp}"
    return [*problems, Problem("layout.zero_backend", message, f"zero_backend={message}")]


STATE_OFFLOAD_BACKEND = {"all": "fsdp2", "optimizer": "deepspeed"}
"""Which backend runs each kind of model-state offload (at ZeRO-2/3)."""


def state_offload_enabled(cluster: ClusterConfig, planner: PlannerConfig) -> bool:
    """planner.state_offload, where auto means on for cuda clusters only (on a cpu cluster
    the host and the "device" are the same memory)."""
    if planner.state_offload == "auto":
        return cluster.device == "cuda"
    return planner.state_offload == "on"


def plan_problems(plan: Plan) -> list[Problem]:
    """What the runtime checks of a finished plan beyond the model (parallel/dims.py): the
    batch arithmetic, the schedule rules, the backend's limits and the layers' modes."""
    layout = plan.layout
    problems = batch_problems(layout, plan.train.global_batch_size)
    problems += schedule_problems(layout) + backend_problems(layout)
    if not full_recompute_runs(layout):
        full = [layer.index for layer in plan.layers if layer.recompute == "full"]
        if full:
            problems.append(
                Problem(
                    f"layers[{full[0]}].recompute",
                    "full recomputation does not run under zero_backend=deepspeed with "
                    "zero_stage=3 (DeepSpeed releases the parameters the recomputed layer "
                    "needs in backward); use zero_backend=fsdp2, zero_stage<=2 or selective",
                )
            )
    return problems


def layout_problems(
    layout: Layout, model: ModelConfig, cluster: ClusterConfig, train: TrainConfig
) -> list[str]:
    """Why the runtime cannot execute `layout` for this model/cluster/batch (empty: it can)."""
    tp, sp, pp, dp = layout.tp, layout.sp, layout.pp, layout.dp
    v = layout.virtual_stages
    problems = world_problems(dp, tp, pp, sp, cluster.world_size, "num_nodes*gpus_per_node")
    if tp > cluster.gpus_per_node:
        problems.append(
            Problem("layout.tp", f"tp={tp} exceeds gpus_per_node={cluster.gpus_per_node}")
        )
    problems += model_problems(model, tp, sp, train.seq_len)
    if pp * v > model.num_layers:
        problems.append(
            Problem("layout", f"pp*virtual_stages={pp * v} exceeds num_layers={model.num_layers}")
        )
    problems += batch_problems(layout, train.global_batch_size)
    micro = layout.micro_batch_size
    if train.micro_batch_size is not None and micro != train.micro_batch_size:
        problems.append(
            Problem(
                "layout.micro_batch_size",
                f"micro_batch_size={micro} != train.micro_batch_size={train.micro_batch_size}",
            )
        )
    problems += schedule_problems(layout) + backend_problems(layout)
    return [str(problem) for problem in problems]


def check_layout(
    layout: Layout, model: ModelConfig, cluster: ClusterConfig, train: TrainConfig
) -> None:
    """Raise ConfigError naming every rule `layout` breaks."""
    problems = layout_problems(layout, model, cluster, train)
    if problems:
        raise ConfigError("layout", "; ".join(problems))


def _schedules(pp: int, g: int, layers: int, planner: PlannerConfig) -> list[tuple[str, int]]:
    """(schedule, virtual_stages) choices for pp ranks and g micro-batches."""
    if pp == 1:
        return [("none", 1)]
    if g < pp:
        return []
    choices = []
    for schedule in planner.pp_schedules:
        if schedule in SINGLE_STAGE:
            choices.append((schedule, 1))
        elif g % pp:
            continue
        elif schedule == "zbv_zero_bubble":
            if 2 * pp <= layers:
                choices.append((schedule, 2))
        else:
            top = min(planner.max_virtual_stages, layers // pp)
            choices.extend((schedule, v) for v in range(2, top + 1))
    return choices


def _degrees(world: int, pinned: int | None) -> list[int]:
    return [d for d in divisors(world) if pinned is None or d == pinned]


def enumerate_layouts(
    model: ModelConfig, cluster: ClusterConfig, train: TrainConfig, planner: PlannerConfig
) -> list[Layout]:
    """Every layout the planner may emit for this model, cluster and batch (deterministic
    order). With one rank sharing the model states (dp x sp = 1) the ZeRO stages shard
    nothing, so only one is listed (_zero_stages)."""
    world = cluster.world_size
    bf16 = training_dtype(cluster, train) == "bf16"
    offloads = ["none", "all", "optimizer"] if state_offload_enabled(cluster, planner) else ["none"]
    layouts = []
    for tp in _degrees(world, planner.tp):
        if tp > cluster.gpus_per_node or any(
            getattr(model, key) % tp for key in ("num_heads", "num_kv_heads", "ffn_size")
        ):
            continue
        heads, kv = model.num_heads // tp, model.num_kv_heads // tp
        for sp in _degrees(world // tp, planner.sp):
            if heads % sp or train.seq_len % sp or (kv % sp and sp % kv):
                continue
            for pp in _degrees(world // (tp * sp), planner.pp):
                dp = world // (tp * sp * pp)
                if pp > model.num_layers or train.global_batch_size % dp:
                    continue
                if planner.dp is not None and dp != planner.dp:
                    continue
                per_rank = train.global_batch_size // dp
                if train.micro_batch_size is not None:
                    sizes = (
                        [train.micro_batch_size] if per_rank % train.micro_batch_size == 0 else []
                    )
                else:
                    sizes = divisors(per_rank, planner.max_micro_batch_size)
                backends = _backends(planner.zero_backend, tp, pp, sp)
                for mb in sizes:
                    g = per_rank // mb
                    for schedule, v in _schedules(pp, g, model.num_layers, planner):
                        layouts.extend(
                            Layout(
                                dp=dp,
                                tp=tp,
                                pp=pp,
                                sp=sp,
                                zero_stage=zero,
                                micro_batch_size=mb,
                                num_microbatches=g,
                                pp_schedule=schedule,
                                zero_backend=backend,
                                virtual_stages=v,
                                state_offload=offload,
                            )
                            for backend in backends
                            for offload in offloads
                            if offload == "none" or backend == STATE_OFFLOAD_BACKEND[offload]
                            for zero in _zero_stages(
                                planner.zero_stages, backend, bf16, dp * sp, offload != "none"
                            )
                            # DeepSpeed ZeRO-2 offload accumulates on the host (backend_problems)
                            if not (offload == "optimizer" and zero == 2 and g > 1)
                        )
    return layouts


def _zero_stages(
    allowed: tuple[int, ...], backend: str, bf16: bool, shard_ranks: int, offload: bool = False
) -> list[int]:
    """The ZeRO stages to try (module doc): one for a single rank (nothing to shard), and in
    bf16 with FSDP2 only the stages whose mixed precision the planner accounts for; with
    model states offloaded, ZeRO-2 and 3 (the stages both backends offload at; they differ
    on one rank too, in how long the gathered parameters live)."""
    stages = sorted(set(allowed))
    if offload:  # on one rank too: ZeRO-2 keeps gathered what ZeRO-3 re-gathers
        return [z for z in stages if z >= 2]
    if bf16 and backend == "fsdp2":
        stages = [z for z in stages if z >= 2]
        return stages[-1:] if shard_ranks == 1 else stages
    return stages[:1] if shard_ranks == 1 else stages


def _backends(choice: str, tp: int, pp: int, sp: int) -> list[str]:
    if choice == "deepspeed":
        return ["deepspeed"] if (tp, pp, sp) == (1, 1, 1) else []
    return ["fsdp2"]


def explain_no_layout(
    model: ModelConfig, cluster: ClusterConfig, train: TrainConfig, planner: PlannerConfig
) -> ConfigError:
    """The ConfigError for a search space with no executable layout at all."""
    world = cluster.world_size
    if train.micro_batch_size is not None and all(
        (train.global_batch_size // d) % train.micro_batch_size or train.global_batch_size % d
        for d in divisors(world)
    ):
        return ConfigError(
            "train.micro_batch_size",
            f"{train.micro_batch_size} does not divide global_batch_size="
            f"{train.global_batch_size} / dp for any dp dividing {world} GPUs",
        )
    if (
        training_dtype(cluster, train) == "bf16"
        and planner.zero_backend != "deepspeed"
        and max(planner.zero_stages) < 2
    ):
        return ConfigError(
            "planner.zero_stages",
            f"{list(planner.zero_stages)} in bf16 with FSDP2: ZeRO-0/1 there run fp32 weights "
            "under autocast, which the planner does not account for; allow 2 or 3, or use "
            "planner.zero_backend=deepspeed",
        )
    pins = {k: getattr(planner, k) for k in ("dp", "tp", "pp", "sp") if getattr(planner, k)}
    pinned = f" with {', '.join(f'planner.{k}={v}' for k, v in pins.items())}" if pins else ""
    return ConfigError(
        "cluster",
        f"no layout of {world} GPUs{pinned} fits model {model.name} "
        f"(heads={model.num_heads}, kv_heads={model.num_kv_heads}, layers={model.num_layers}), "
        f"seq_len={train.seq_len} and global_batch_size={train.global_batch_size}; "
        "see planner/layouts.py for the rules",
    )
