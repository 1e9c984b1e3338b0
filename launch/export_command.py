"""`memplan export export.format=deepspeed|accelerate export.out=PATH [HYDRA OVERRIDES]`: a
plan (planned now, or plan.path=PLAN) as a DeepSpeed config JSON or an accelerate config YAML
(plan.out=PATH also writes memplan's plan).

`memplan export export.checkpoint=DIR export.out=DIR` (export.format=hf, the default when a
checkpoint is given): the model of a committed checkpoint of any layout as a Hugging Face
directory (framework/components/hf_export.py; torch is imported only for this format).

What the target cannot express (token-wise offload, per-layer policy mixes, tensor, pipeline
or sequence parallelism) is mapped to the nearest configuration it can
(planner/targets.nearest_settings); memplan evaluates THAT configuration with its own cost
model and prints both predicted peaks side by side. The DeepSpeed JSON comes from the same
builder memplan's DeepSpeed runtime uses (planner/deepspeed_config.py). Exit codes
(launch/cli.py): 2 bad input, 3 no feasible plan.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from configs.errors import ConfigError
from configs.schema import Config
from launch.compose import compose_config, warn_config
from launch.plan_command import policy_totals
from launch.plan_source import plan_for
from launch.run_dir import check_writable_dir, check_writable_file
from planner.accelerate_config import accelerate_config
from planner.deepspeed_config import deepspeed_config
from planner.plan import Plan, ZeroBackend
from planner.targets import TargetSettings, equivalent_plan, fits, nearest_settings
from planner.units import format_bytes


def console_for_output() -> Console:
    """rich assumes 80 columns in a pipe: 140 unless COLUMNS says otherwise."""
    piped = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(width=140 if piped else None)


def compact_layout(plan: Plan) -> str:
    """'dp8 tp1 pp1 sp1 | ZeRO-3 deepspeed | 2 x 4 micro-batches | no pipeline'."""
    lay = plan.layout
    schedule = "no pipeline" if lay.pp == 1 else lay.pp_schedule
    return (
        f"dp{lay.dp} tp{lay.tp} pp{lay.pp} sp{lay.sp} | ZeRO-{lay.zero_stage} {lay.zero_backend}"
        f" | {lay.micro_batch_size} x {lay.num_microbatches} micro-batches | {schedule}"
    )


def comparison_table(title: str, columns: list[tuple[str, Plan | str]]) -> Table:
    """Plans side by side (a str column: why there is no plan, e.g. none fits)."""
    table = Table(title=title, title_justify="left")
    table.add_column("")
    for name, _ in columns:
        table.add_column(name, justify="right")
    rows = {
        "layout": compact_layout,
        "activation policy": lambda p: policy_totals(p),
        "peak per GPU": lambda p: f"[bold]{format_bytes(p.memory.gpu_peak_bytes)}[/bold]",
        "GPU budget": lambda p: format_bytes(p.memory.gpu_budget_bytes),
        "fits": lambda p: "yes" if fits(p) else "[red]no[/red]",
        "host RAM per node": lambda p: format_bytes(p.memory.host_bytes_per_node),
        "step time": lambda p: f"{p.time.step_seconds:.4g} s",
        "tokens/s": lambda p: f"{p.time.tokens_per_second:,.0f}",
        "MFU": lambda p: f"{100 * p.time.mfu:.1f}%",
    }
    for row, cell in rows.items():
        values = [cell(plan) if isinstance(plan, Plan) else "" for _, plan in columns]
        table.add_row(row, *values)
    for name, plan in columns:
        if isinstance(plan, str):
            table.add_row(f"{name}", *[plan if n == name else "" for n, _ in columns])
    return table


def target_backend(cfg: Config, plan: Plan) -> tuple[str, ZeroBackend]:
    """(what the file is, whose ZeRO accounting applies) for export.format and
    export.accelerate_backend."""
    export = cfg.export
    if export.resolved_format == "deepspeed":
        return "DeepSpeed", "deepspeed"
    choice = export.accelerate_backend
    if choice == "auto":
        lay = plan.layout
        choice = "fsdp" if lay.zero_backend == "fsdp2" and lay.zero_stage in (2, 3) else "deepspeed"
    return (
        ("accelerate FSDP2", "fsdp2") if choice == "fsdp" else ("accelerate DeepSpeed", "deepspeed")
    )


def deepspeed_json_beside(out: Path) -> Path:
    """Where an accelerate DeepSpeed export puts its JSON: accel.yaml -> accel.deepspeed.json."""
    return out.with_name(f"{out.stem}.deepspeed.json")


def _write(path: Path, text: str, key: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as exc:
        raise ConfigError(key, f"cannot write {path}: {exc.strerror}") from exc


def export_files(
    cfg: Config, settings: TargetSettings, exported: Plan, out: Path
) -> dict[Path, str]:
    """The files to write, path -> text: the DeepSpeed JSON and/or the accelerate YAML."""
    ds = deepspeed_config(exported, cfg.train.grad_clip, bf16=exported.train.dtype == "bf16")
    ds_text = json.dumps(ds, indent=2) + "\n"
    if cfg.export.resolved_format == "deepspeed":
        return {out: ds_text}
    files: dict[Path, str] = {}
    ds_file = None
    if settings.zero_backend == "deepspeed":
        ds_path = deepspeed_json_beside(out)
        check_writable_file(ds_path, "export.out")
        files[ds_path] = ds_text
        ds_file = str(ds_path)
    cluster = cfg.cluster
    config = accelerate_config(settings, cluster.num_nodes, cluster.world_size, ds_file)
    files[out] = yaml.safe_dump(config, sort_keys=False)
    return files


def run(args: Sequence[str]) -> int:
    """Entry point of `memplan export` (launch/cli.py maps ConfigError and NoFeasiblePlan)."""
    cfg = compose_config(list(args))
    if cfg.export.resolved_format == "hf":
        return export_checkpoint(cfg)
    if cfg.export.checkpoint:
        raise ConfigError(
            "export.checkpoint", f"read by export.format=hf only, not {cfg.export.format}"
        )
    warn_config(cfg)
    if not cfg.export.out:
        raise ConfigError(
            "export.out", "required: the file to write, e.g. export.out=ds_config.json"
        )
    for key, value in (("plan.plot", cfg.plan.plot), ("plan.import_from", cfg.plan.import_from)):
        if value:
            raise ConfigError(key, "not used by memplan export (plan.out= writes memplan's plan)")
    out = check_writable_file(cfg.export.out, "export.out")
    if cfg.plan.out:
        check_writable_file(cfg.plan.out, "plan.out")
    plan = plan_for(cfg)
    kind, backend = target_backend(cfg, plan)
    settings = nearest_settings(plan, cfg, kind, backend)
    exported = equivalent_plan(cfg, settings)
    files = export_files(cfg, settings, exported, out)
    console = console_for_output()
    console.print(f"{kind} config: {settings.describe(cfg.cluster.world_size)}", highlight=False)
    columns: list[tuple[str, Plan | str]] = [
        ("memplan plan", plan),
        (f"exported ({kind})", exported),
    ]
    console.print(comparison_table("predicted by memplan's cost model", columns))
    for note in settings.notes:
        console.print(f"mapped: {note}", highlight=False)
    for path, text in files.items():
        _write(path, text, "export.out")
        console.print(f"wrote {path}", highlight=False)
    if cfg.plan.out:
        _write(Path(cfg.plan.out), plan.to_json(), "plan.out")
        console.print(f"wrote {cfg.plan.out}", highlight=False)
    return 0


def export_checkpoint(cfg: Config) -> int:
    """export.format=hf: a committed checkpoint as a Hugging Face model directory."""
    export = cfg.export
    if not export.checkpoint:
        raise ConfigError(
            "export.checkpoint", "required by export.format=hf: a committed checkpoint directory"
        )
    if not export.out:
        raise ConfigError("export.out", "required: the directory to write, e.g. export.out=hf")
    out = check_writable_dir(export.out, "export.out")
    if out.is_dir() and any(out.iterdir()):  # never overwrite what is already there
        raise ConfigError("export.out", f"{out} exists and is not empty")
    from framework.components.hf_export import export_hf  # imports torch

    result = export_hf(export.checkpoint, str(out), export.dtype, int(export.max_shard_gib * 2**30))
    console = console_for_output()
    console.print(
        f"exported step {result.step} ({result.num_tensors} tensors,"
        f" {format_bytes(result.total_bytes)} {export.dtype}) as a Hugging Face"
        f" {result.model_type} model",
        highlight=False,
    )
    console.print(f"wrote {result.out}: {', '.join(result.files)}", highlight=False)
    return 0
