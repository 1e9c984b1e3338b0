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
from planner.layouts import model_problems, plan_problems, raise_first, world_problems
from planner.plan import Plan

MESH_DIMS = ("pp", "dp", "sp", "tp")


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
        dp, tp, pp, sp = self.dp, self.tp, self.pp, self.sp
        raise_first(world_problems(dp, tp, pp, sp, self.world_size, "world_size"))

    @staticmethod
    def from_plan(plan: Plan, model: ModelConfig, seq_len: int, world_size: int) -> ParallelDims:
        """The plan's degrees, after checking everything the runtime relies on."""
        layout = plan.layout
        dims = ParallelDims(layout.dp, layout.tp, layout.pp, layout.sp, world_size)
        dims.check_model(model, seq_len)
        dims.check_plan(plan)
        return dims

    def check_model(self, model: ModelConfig, seq_len: int) -> None:
        """Head, kv-head, FFN and sequence divisibility for tensor and Ulysses parallelism
        (planner/layouts.py has the rules)."""
        raise_first(model_problems(model, self.tp, self.sp, seq_len))

    def check_plan(self, plan: Plan) -> None:
        """Batch arithmetic, schedule/virtual-stage rules, backend limits, the layers' modes
        (planner/layouts.py has the rules) and the stage split."""
        raise_first(plan_problems(plan))
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
