"""The layouts the distributed tests run, all on the tiny model, fp32 on CPU:

- CASES: the issue's table (name, world size, layout fields, config overrides, activation
  policy), five steps each;
- planner_kind_cases(): small instances covering every kind of layout the planner can emit
  for 2 and 4 ranks (planner.layouts.enumerate_layouts), two steps each;
- run_worker(): one torchrun of layout_worker.py over many cases of one world size.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from configs.schema import Config
from launch.compose import compose_config, dump_resolved
from planner.plan import LayerPlan, Layout, Plan
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
    """"none", "offload" (token-wise offload + recompute), "recompute" (full/selective), or
    "planner": the layout and per-layer policies are the planner's own plan for the config
    (the overrides pin degrees and squeeze memory so that it mixes offload and recompute)."""
    micro_batch_size: int | None = None
    cli: bool = True
    """Also run through `memplan train` (the issue's table and the one-rank runs); the
    extra combinations run in the layout worker only, to keep the suite short."""

    def overrides_for_cli(self) -> list[str]:
        return [*BASE_OVERRIDES, f"cluster.gpus_per_node={self.world}", *self.overrides]

    def config(self) -> Config:
        return _compose(tuple(self.overrides_for_cli()))

    def plan(self) -> Plan:
        cfg = self.config()
        if self.policy == "planner":
            return _planned(cfg)
        plan = manual_plan(cfg, micro_batch_size=self.micro_batch_size, **self.layout)
        if self.policy == "none":
            return plan
        layers = tuple(_policy(layer, self.policy) for layer in plan.layers)
        return dataclasses.replace(plan, layers=layers)

    def write(self, directory: Path) -> Path:
        """A run directory as `memplan train` writes it: resolved.yaml + plan.json."""
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "resolved.yaml").write_text(dump_resolved(self.config()))
        self.plan().write(directory / "plan.json")
        return directory


@functools.cache
def _compose(overrides: tuple[str, ...]) -> Config:
    return compose_config(list(overrides))


@functools.cache
def _planned(cfg: Config) -> Plan:
    from planner.make import make_plan

    return make_plan(cfg)


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
PLANNED = ("planner.offload=on",)

CASES = [
    *(
        Case(f"dp2_zero{z}_{backend}", 2, {"dp": 2, "zero_stage": z, "zero_backend": backend})
        for backend in ("fsdp2", "deepspeed")
        for z in (0, 1, 2, 3)
    ),
    Case("pp2_gpipe", 2, _pp("gpipe"), micro_batch_size=2),
    Case("pp2_1f1b", 2, _pp("1f1b"), micro_batch_size=2),
    Case("pp2_interleaved_1f1b", 2, _pp("interleaved_1f1b", 2), micro_batch_size=2),
    Case("pp2_interleaved_zero_bubble", 2, _pp("interleaved_zero_bubble", 2), micro_batch_size=2),
    Case("pp2_zbv_zero_bubble", 2, _pp("zbv_zero_bubble", 2), micro_batch_size=2),
    Case("sp2", 2, {"sp": 2}, micro_batch_size=4),
    Case("tp2", 2, {"tp": 2}, micro_batch_size=4),
    Case("sp2_offload", 2, {"sp": 2}, policy="offload", micro_batch_size=4),
    Case("dp2_zero3_offload", 2, {"dp": 2, "zero_stage": 3}, policy="offload", cli=False),
    Case("dp2_zero3_recompute", 2, {"dp": 2, "zero_stage": 3}, policy="recompute", cli=False),
    Case("dp2_zero3_deepspeed_offload", 2,
         {"dp": 2, "zero_stage": 3, "zero_backend": "deepspeed"}, policy="offload",
         cli=False),
    Case("dp2_zero2_deepspeed_recompute", 2,
         {"dp": 2, "zero_stage": 2, "zero_backend": "deepspeed"}, policy="recompute", cli=False),
    Case("pp2_1f1b_recompute", 2, _pp("1f1b"), policy="recompute", micro_batch_size=2),
    # tied embeddings: the last stage's copy on the other pp rank, and on the same one (V)
    Case("pp2_1f1b_tied_zero3", 2, _pp("1f1b", zero_stage=3), TIED, micro_batch_size=2, cli=False),
    Case("pp2_zbv_tied", 2, _pp("zbv_zero_bubble", 2), TIED, micro_batch_size=2, cli=False),
    Case("dp2_pp2_zero3", 4, {"dp": 2, **_pp("1f1b", zero_stage=3)}, micro_batch_size=2),
    Case("dp2_pp2_zero1_interleaved", 4, {"dp": 2, **_pp("interleaved_1f1b", 2, zero_stage=1)},
         micro_batch_size=2, cli=False),
    Case("dp2_sp2_zero2", 4, {"dp": 2, "sp": 2, "zero_stage": 2}, micro_batch_size=2),
    # kv heads per tp rank (1) < sp (2): Ulysses replicates kv heads; FSDP x TP is 2-D
    Case("tp2_sp2_zero3", 4, {"tp": 2, "sp": 2, "zero_stage": 3}, micro_batch_size=4, cli=False),
    Case("sp4", 4, {"sp": 4}, micro_batch_size=8, cli=False),
    # the planner's own per-layer policies under the layouts it picks when memory is tight
    # (10-12 MB devices, offload on, degrees pinned): offload, and on the pipelined ones
    # offload mixed with token-wise or selective recompute
    Case("planned_dp2", 2, {}, (*PLANNED, "cluster.gpu_memory_gib=0.011", "planner.dp=2"),
         policy="planner", cli=False),
    Case("planned_sp2", 2, {}, (*PLANNED, "cluster.gpu_memory_gib=0.0105", "planner.sp=2"),
         policy="planner", cli=False),
    Case("planned_pp2", 2, {}, (*PLANNED, "cluster.gpu_memory_gib=0.012", "planner.pp=2"),
         policy="planner", cli=False),
    Case("planned_dp2_pp2", 4, {},
         (*PLANNED, "cluster.gpu_memory_gib=0.011", "planner.dp=2", "planner.pp=2"),
         policy="planner", cli=False),
    # one rank under torchrun: FSDP2 and DeepSpeed (what a single-GPU benchmark runs)
    Case("dp1_zero3_fsdp2", 1, {"zero_stage": 3}, micro_batch_size=4),
    Case("dp1_zero2_deepspeed", 1, {"zero_stage": 2, "zero_backend": "deepspeed"},
         micro_batch_size=4),
]  # fmt: skip


RESUME_AT = 3


@dataclass(frozen=True)
class ResumeCase:
    """Train `first` for RESUME_AT steps with a checkpoint (checkpoint.exit_after), then
    `second` (another layout, same world size) resumes from it to STEPS: its losses must be
    the single-process ones, so the checkpoint resharded between layouts."""

    name: str
    world: int
    first: Case
    second: Case

    def write(self, directory: Path) -> Path:
        checkpoints = directory / "checkpoints"
        common = (f"checkpoint.dir={checkpoints}", "checkpoint.async_mode=thread")
        stop = (
            f"checkpoint.every={RESUME_AT}",
            f"checkpoint.exit_after={RESUME_AT}",
            "checkpoint.resume=none",
        )
        for part, extra in (("first", stop), ("second", ())):
            case = getattr(self, part)
            dataclasses.replace(case, overrides=(*case.overrides, *common, *extra)).write(
                directory / part
            )
        return directory


def _resume(first: Case, second: Case) -> ResumeCase:
    return ResumeCase(f"resume_{first.name}_to_{second.name}", first.world, first, second)


RESUME_CASES = [
    # tied copy + flattened optimizer state: pipeline (V) -> FSDP
    _resume(
        Case("pp2_zbv_tied", 2, _pp("zbv_zero_bubble", 2), TIED, micro_batch_size=2),
        Case("dp2_zero3_tied", 2, {"dp": 2, "zero_stage": 3}, TIED),
    ),
    # DeepSpeed ZeRO-2 -> Ulysses with ZeRO-1 owners, and FSDP ZeRO-1 -> DeepSpeed ZeRO-3
    _resume(
        Case("dp2_zero2_deepspeed", 2, {"dp": 2, "zero_stage": 2, "zero_backend": "deepspeed"}),
        Case("sp2_zero1", 2, {"sp": 2, "zero_stage": 1}, micro_batch_size=4),
    ),
    _resume(
        Case("dp2_zero1_fsdp2", 2, {"dp": 2, "zero_stage": 1}),
        Case("dp2_zero3_deepspeed", 2, {"dp": 2, "zero_stage": 3, "zero_backend": "deepspeed"}),
    ),
    # interleaved pipeline with ZeRO-1 -> FSDP x TP x Ulysses
    _resume(
        Case("dp2_pp2_zero1", 4, {"dp": 2, **_pp("interleaved_1f1b", 2, zero_stage=1)},
             micro_batch_size=2),
        Case("tp2_sp2_zero3", 4, {"tp": 2, "sp": 2, "zero_stage": 3}, micro_batch_size=4),
    ),
]  # fmt: skip


PLANNER_STEPS = 2


def layout_features(layout: Layout) -> tuple[str, str, str]:
    """What selects code paths: the degrees > 1; how model states are replicated or sharded
    (ZeRO stage and backend, moot with one rank per replica group); the schedule."""
    # which degrees exceed 1 (their values add no code path, except pp > 2: middle stages
    # that hold neither the embedding nor the loss)
    degrees = [d for d in ("dp", "tp", "pp", "sp") if getattr(layout, d) > 1]
    if layout.pp > 2:
        degrees[degrees.index("pp")] = "pp3+"
    zero = f"zero{layout.zero_stage}" if layout.dp * layout.sp > 1 else "nozero"
    schedule = "nopp" if layout.pp == 1 else f"{layout.pp_schedule}_v{layout.virtual_stages}"
    return "x".join(degrees), f"{zero}_{layout.zero_backend}", schedule


def _pairs(features: tuple[str, str, str]) -> set[tuple[str, str]]:
    """Pairs to cover: degrees with ZeRO, degrees with schedule, and FSDP (ZeRO-2/3) with
    schedule (FSDP's hooks interact with each schedule's backward; ZeRO-0/1 act after it)."""
    degrees, zero, schedule = features
    pairs = {(degrees, zero), (degrees, schedule)}
    if zero.startswith(("zero2_fsdp2", "zero3_fsdp2")):
        pairs.add((zero, schedule))
    return pairs


def planner_kind_cases(worlds: tuple[int, ...] = (2, 4)) -> list[Case]:
    """Layouts the planner enumerates (both ZeRO backends), picked greedily until every pair
    (see _pairs) of values the planner can emit runs at least once, the table's CASES
    counting as already run. Two steps each."""
    from planner.layouts import enumerate_layouts

    covered = set().union(*(_pairs(layout_features(c.plan().layout)) for c in CASES))
    chosen = []
    for world in worlds:
        # a short warm-up, so that two steps move the parameters about as much as five of the
        # table (lr 3e-3 x 1/4, 2/4 vs 1/20 ... 5/20)
        overrides = (f"train.steps={PLANNER_STEPS}", "train.warmup_steps=4")
        cfg = _compose((*BASE_OVERRIDES, f"cluster.gpus_per_node={world}", *overrides))
        candidates = []
        for backend in ("auto", "deepspeed"):
            planner = dataclasses.replace(cfg.planner, zero_backend=backend)
            candidates += enumerate_layouts(cfg.model, cfg.cluster, cfg.train, planner)
        while True:
            best = max(
                candidates,
                key=lambda x: (len(_pairs(layout_features(x)) - covered), x.micro_batch_size),
            )
            new = _pairs(layout_features(best)) - covered
            if not new:
                break
            covered |= new
            fields = dataclasses.asdict(best)
            micro = fields.pop("micro_batch_size")
            name = f"plan_w{world}_" + "_".join(layout_features(best))
            chosen.append(Case(name, world, fields, overrides, micro_batch_size=micro))
    return chosen


REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("layout_worker.py")


def run_worker(
    cases: list[Case], world: int, root: Path, timeout_seconds: float = 600
) -> tuple[dict, str]:
    """Write the cases' run directories under root and train them all in one torchrun of
    `world` ranks; returns (results by case name, the run's output for failure messages)."""
    for case in cases:
        case.write(root / case.name)
    out = root / "results.json"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={world}", str(WORKER), str(root), str(out),
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=timeout_seconds, check=False
    )
    results = json.loads(out.read_text()) if out.exists() else {}
    return results, (done.stdout + done.stderr)[-6000:]


def torchrun(
    script: str | Path, *args: str | Path, ranks: int = 2, timeout_seconds: float = 600
) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone --nproc-per-node=RANKS SCRIPT ARGS` from
    the repository (importable by the workers), captured."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={ranks}", str(script), *map(str, args),
    ]  # fmt: skip
    return subprocess.run(
        command,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout_seconds,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


_LOSS = re.compile(r"step (\d+) \| loss (\d+\.\d{4}) \|")


def printed_losses(output: str) -> dict[int, float]:
    """Losses of the metrics lines (`step N | loss X.XXXX | ...`) by step."""
    return {int(step): float(loss) for step, loss in _LOSS.findall(output)}


def memplan_train(case: Case, plan: Path, root: Path) -> subprocess.CompletedProcess:
    """`memplan train` of the case's plan, as a user runs it."""
    script = Path(sys.executable).parent / "memplan"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "launch.cli"]
    return subprocess.run(
        [
            *command,
            "train",
            f"plan.path={plan}",
            *case.overrides_for_cli(),
            f"launch.run_dir={root / case.name}",
        ],
        cwd=REPO,
        env={**os.environ, "WANDB_MODE": "offline"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
