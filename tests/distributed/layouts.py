"""The layout table shared by the distributed tests: (name, world size, layout fields,
config overrides, activation policy), all on the tiny model, fp32 on CPU."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from launch.compose import compose_config, dump_resolved
from planner.plan import LayerPlan, Plan
from tests.plans import manual_plan

STEPS = 5
BASE_OVERRIDES = (
    "model=tiny",
    "cluster=cpu",
    "train.seq_len=64",
    "train.global_batch_size=8",
    f"train.steps={STEPS}",
    "logging.every=1",
    "logging.wandb=false",
)


@dataclass(frozen=True)
class Case:
    """One row of the table."""

    name: str
    world: int
    layout: dict[str, object]
    overrides: tuple[str, ...] = ()
    policy: str = "none"
    """"none", "offload" (token-wise offload + recompute) or "recompute" (full/selective)."""
    micro_batch_size: int | None = None
    tags: tuple[str, ...] = field(default=())

    def overrides_for_cli(self) -> list[str]:
        return [*BASE_OVERRIDES, f"cluster.gpus_per_node={self.world}", *self.overrides]

    def plan(self) -> Plan:
        cfg = compose_config(self.overrides_for_cli())
        plan = manual_plan(cfg, micro_batch_size=self.micro_batch_size, **self.layout)
        if self.policy == "none":
            return plan
        layers = tuple(_policy(layer, self.policy) for layer in plan.layers)
        return dataclasses.replace(plan, layers=layers)

    def write(self, directory: Path) -> Path:
        """A run directory as `memplan train` writes it: resolved.yaml + plan.json."""
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "resolved.yaml").write_text(
            dump_resolved(compose_config(self.overrides_for_cli()))
        )
        self.plan().write(directory / "plan.json")
        return directory


def _policy(layer: LayerPlan, kind: str) -> LayerPlan:
    if kind == "offload":  # MEMO-style: anchors swapped, token-local split three ways
        return LayerPlan(layer.index, layer.stage, 0.5, "none", 0.25, anchor_offload_fraction=1.0)
    if kind == "recompute":
        recompute = "full" if layer.index % 2 == 0 else "selective"
        return LayerPlan(layer.index, layer.stage, 0.0, recompute, 0.0)
    raise ValueError(kind)


def _pp(schedule: str, virtual: int = 1, **extra: object) -> dict[str, object]:
    return {"pp": 2, "pp_schedule": schedule, "virtual_stages": virtual, **extra}


TIED = ("model.tie_embeddings=true",)

CASES = [
    *(
        Case(f"dp2_zero{stage}_{backend}", 2, {"dp": 2, "zero_stage": stage, "zero_backend": backend})
        for backend in ("fsdp2", "deepspeed")
        for stage in (0, 1, 2, 3)
    ),
    Case("pp2_gpipe", 2, _pp("gpipe"), micro_batch_size=2),
    Case("pp2_1f1b", 2, _pp("1f1b"), micro_batch_size=2),
    Case("pp2_interleaved_1f1b", 2, _pp("interleaved_1f1b", 2), micro_batch_size=2),
    Case("pp2_interleaved_zero_bubble", 2, _pp("interleaved_zero_bubble", 2), micro_batch_size=2),
    Case("pp2_zbv_zero_bubble", 2, _pp("zbv_zero_bubble", 2), micro_batch_size=2),
    Case("sp2", 2, {"sp": 2}, micro_batch_size=4),
    Case("tp2", 2, {"tp": 2}, micro_batch_size=4),
    Case("sp2_offload", 2, {"sp": 2}, policy="offload", micro_batch_size=4),
    Case("pp2_1f1b_recompute", 2, _pp("1f1b"), policy="recompute", micro_batch_size=2),
    # tied embeddings: the last stage's copy on the other pp rank, and on the same one (V)
    Case("pp2_1f1b_tied_zero3", 2, _pp("1f1b", zero_stage=3), TIED, micro_batch_size=2),
    Case("pp2_zbv_tied", 2, _pp("zbv_zero_bubble", 2), TIED, micro_batch_size=2),
    Case("dp2_pp2_zero3", 4, {"dp": 2, **_pp("1f1b", zero_stage=3)}, micro_batch_size=2),
    Case("dp2_pp2_zero1_interleaved", 4, {"dp": 2, **_pp("interleaved_1f1b", 2, zero_stage=1)},
         micro_batch_size=2),
    Case("dp2_sp2_zero2", 4, {"dp": 2, "sp": 2, "zero_stage": 2}, micro_batch_size=2),
    # kv heads per tp rank (1) < sp (2): Ulysses replicates kv heads; FSDP x TP is 2-D
    Case("tp2_sp2_zero3", 4, {"tp": 2, "sp": 2, "zero_stage": 3}, micro_batch_size=4),
    Case("sp4", 4, {"sp": 4}, micro_batch_size=8),
]  # fmt: skip
