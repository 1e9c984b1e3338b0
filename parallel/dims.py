"""ParallelDims: the layout's degrees, checked against the model and the plan, and the mesh.

Mesh order (pp, dp, sp, tp), tp innermost so tensor-parallel groups share a node, as the
planner's cost model assumes. Two flattened dimensions of the same root mesh (ParallelMesh):
- dp_sp: every rank that holds the same parameters for different tokens (dp rows x sp
  sequence chunks). Gradients are averaged over it and ZeRO shards over it.
- pp_dp_sp: the ranks whose losses together make the global-batch mean (tp ranks repeat
  the same loss).
Nothing is global: the meshes are returned and passed down explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from configs.errors import ConfigError
from configs.schema import ModelConfig
from planner.plan import Plan

MESH_DIMS = ("pp", "dp", "sp", "tp")
MULTI_STAGE_SCHEDULES = ("interleaved_1f1b", "interleaved_zero_bubble", "zbv_zero_bubble")


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of one layout; world = dp x tp x pp x sp exactly."""

    dp: int
    tp: int
    pp: int
    sp: int
    world_size: int

    def __post_init__(self) -> None:
        for key in ("dp", "tp", "pp", "sp"):
            if getattr(self, key) < 1:
                raise ConfigError(f"layout.{key}", f"must be >= 1, got {getattr(self, key)}")
        product = self.dp * self.tp * self.pp * self.sp
        if product != self.world_size:
            raise ConfigError(
                "layout",
                f"dp*tp*pp*sp={self.dp}*{self.tp}*{self.pp}*{self.sp}={product} != "
                f"world_size={self.world_size}",
            )

    @staticmethod
    def from_plan(plan: Plan, model: ModelConfig, seq_len: int, world_size: int) -> ParallelDims:
        """The plan's degrees, after checking everything the runtime relies on."""
        layout = plan.layout
        dims = ParallelDims(layout.dp, layout.tp, layout.pp, layout.sp, world_size)
        dims.check_model(model, seq_len)
        dims.check_plan(plan)
        return dims

    def check_model(self, model: ModelConfig, seq_len: int) -> None:
        """Head, kv-head, FFN and sequence divisibility for tensor and Ulysses parallelism."""
        tp, sp = self.tp, self.sp
        for key in ("num_heads", "num_kv_heads", "ffn_size"):
            if getattr(model, key) % tp:
                raise ConfigError(
                    "layout.tp", f"model.{key}={getattr(model, key)} not divisible by tp={tp}"
                )
        heads, kv_heads = model.num_heads // tp, model.num_kv_heads // tp
        if heads % sp:
            raise ConfigError("layout.sp", f"num_heads/tp={heads} not divisible by sp={sp}")
        if kv_heads % sp and sp % kv_heads:
            raise ConfigError(
                "layout.sp",
                f"num_kv_heads/tp={kv_heads} and sp={sp}: Ulysses needs one to divide the other",
            )
        if seq_len % sp:
            raise ConfigError("layout.sp", f"train.seq_len={seq_len} not divisible by sp={sp}")

    def check_plan(self, plan: Plan) -> None:
        """Batch arithmetic, schedule/virtual-stage rules, backend limits and the stage split."""
        layout = plan.layout
        micro, g = layout.micro_batch_size, layout.num_microbatches
        if self.dp * micro * g != plan.train.global_batch_size:
            raise ConfigError(
                "layout",
                f"dp*micro_batch_size*num_microbatches={self.dp}*{micro}*{g} != "
                f"global_batch_size={plan.train.global_batch_size}",
            )
        schedule, v = layout.pp_schedule, layout.virtual_stages
        if self.pp > 1 and g < self.pp:
            raise ConfigError("layout.num_microbatches", f"{g} < pp={self.pp}")
        if schedule in ("none", "gpipe", "1f1b") and v != 1:
            raise ConfigError("layout.virtual_stages", f"pp_schedule={schedule} needs 1, got {v}")
        if schedule in ("interleaved_1f1b", "interleaved_zero_bubble") and v < 2:
            raise ConfigError(
                "layout.virtual_stages", f"pp_schedule={schedule} needs >= 2, got {v}"
            )
        if schedule == "zbv_zero_bubble" and v != 2:
            raise ConfigError("layout.virtual_stages", f"pp_schedule={schedule} needs 2, got {v}")
        if schedule in MULTI_STAGE_SCHEDULES and g % self.pp:
            raise ConfigError(
                "layout.num_microbatches",
                f"pp_schedule={schedule} needs num_microbatches={g} divisible by pp={self.pp}",
            )
        if layout.zero_backend == "deepspeed" and (self.tp, self.pp, self.sp) != (1, 1, 1):
            raise ConfigError(
                "layout.zero_backend",
                f"deepspeed needs tp=pp=sp=1, got tp={self.tp} pp={self.pp} sp={self.sp}",
            )
        if layout.zero_backend == "deepspeed" and layout.zero_stage == 3:
            full = [layer.index for layer in plan.layers if layer.recompute == "full"]
            if full:
                raise ConfigError(
                    f"layers[{full[0]}].recompute",
                    "full recomputation does not run under zero_backend=deepspeed with "
                    "zero_stage=3 (DeepSpeed releases the parameters the recomputed layer "
                    "needs in backward); use zero_backend=fsdp2, zero_stage<=2 or selective",
                )
        stage_layers(plan)

    @property
    def dp_sp(self) -> int:
        """Ranks that hold the same parameters for different tokens (ZeRO's Nd)."""
        return self.dp * self.sp

    def build_mesh(self, device_type: str) -> ParallelMesh:
        """The (pp, dp, sp, tp) mesh, its 1-D slices and the flattened dimensions."""
        world = init_device_mesh(
            device_type, (self.pp, self.dp, self.sp, self.tp), mesh_dim_names=MESH_DIMS
        )
        return ParallelMesh(
            world=world,
            pp=world["pp"],
            dp=world["dp"],
            sp=world["sp"],
            tp=world["tp"],
            dp_sp=world["dp", "sp"]._flatten("dp_sp"),
            pp_dp_sp=world["pp", "dp", "sp"]._flatten("pp_dp_sp"),
        )


@dataclass(frozen=True)
class ParallelMesh:
    """The meshes a layout uses, all views of one root (so FSDP and TP compose)."""

    world: DeviceMesh
    """(pp, dp, sp, tp)."""
    pp: DeviceMesh
    dp: DeviceMesh
    sp: DeviceMesh
    tp: DeviceMesh
    dp_sp: DeviceMesh
    """Ranks holding the same parameters for different tokens: gradients are averaged and
    ZeRO shards over it."""
    pp_dp_sp: DeviceMesh
    """Ranks whose losses make up the global-batch mean (tp ranks repeat theirs)."""


def stage_layers(plan: Plan) -> list[list[int]]:
    """Layer indices of each global pipeline stage, as planned; every stage needs one."""
    stages: list[list[int]] = [[] for _ in range(plan.layout.num_stages)]
    for layer in plan.layers:
        stages[layer.stage].append(layer.index)
    empty = [stage for stage, layers in enumerate(stages) if not layers]
    if empty:
        raise ConfigError(
            "layers",
            f"pipeline stage {empty[0]} of pp*virtual_stages={len(stages)} holds no layer "
            f"(num_layers={len(plan.layers)})",
        )
    return stages
