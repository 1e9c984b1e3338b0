"""`memplan plan import=PATH [HYDRA OVERRIDES]` (= plan.import_from=PATH): evaluate a user's
DeepSpeed config JSON or accelerate config YAML (recognised by content) for the model,
cluster and sequence length given: predicted peak per GPU, whether it fits, and memplan's
own plan beside it. `import` is a Python keyword and cannot be a schema field, so
`import=PATH` is rewritten to plan.import_from=PATH before composing.

The file's settings become a memplan Plan (planner/targets.equivalent_plan) evaluated by
memplan's cost model; memplan's own plan is made for the same global batch and dtype. What
the file cannot say (an accelerate config holds no batch size) comes from train.*. Bad
files (missing, not JSON/YAML, unknown ZeRO stage, inconsistent batch sizes, settings memplan
does not model) are exit 2 with one line naming the file and the key. A config that does not
fit is a result, exit 0.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from configs.errors import ConfigError
from configs.schema import Config
from launch.export_command import comparison_table, console_for_output
from launch.plan_source import plan_for
from launch.run_dir import check_writable_file
from planner.accelerate_config import (
    check_processes,
    ddp_settings,
    fsdp_settings,
    inline_deepspeed_settings,
    is_accelerate_config,
)
from planner.costs import training_dtype
from planner.deepspeed_config import deepspeed_settings, is_deepspeed_config
from planner.errors import NoFeasiblePlan
from planner.plan import Plan
from planner.targets import TargetSettings, equivalent_plan, settings_config

KEY = "plan.import_from"


def rewrite_import(overrides: Sequence[str]) -> list[str]:
    """`import=PATH` -> `plan.import_from=PATH` (the issue's spelling of the key)."""
    return [
        f"plan.import_from={arg.split('=', 1)[1]}" if arg.startswith("import=") else arg
        for arg in overrides
    ]


def read_mapping(path: str | Path, key: str = KEY) -> dict[str, Any]:
    """The mapping in a JSON or YAML file; ConfigError under `key` naming the file."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            key, f"{path} is not JSON or YAML (not UTF-8 text: byte {exc.start})"
        ) from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f", line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(key, f"{path} is not JSON or YAML (YAML parse error{where})") from exc
    if not isinstance(data, dict):
        raise ConfigError(key, f"{path} does not hold a mapping (a DeepSpeed or accelerate config)")
    return data


def _deepspeed_file(data: dict[str, Any], path: str) -> str | None:
    """The deepspeed_config_file an accelerate config names: as given (accelerate resolves
    it from the working directory), else beside the YAML."""
    ds = data.get("deepspeed_config") or {}
    if not isinstance(ds, dict):
        raise ConfigError(KEY, f"{path}: deepspeed_config must be a mapping")
    name = ds.get("deepspeed_config_file")
    if not name or name == "none":
        return None
    if Path(name).is_absolute() or Path(name).exists():
        return str(name)
    beside = Path(path).parent / name
    return str(beside) if beside.exists() else str(name)


def import_settings(cfg: Config, path: str) -> TargetSettings:
    """The settings of the file at `path` (a DeepSpeed JSON or accelerate YAML)."""
    data = read_mapping(path)
    cluster, train = cfg.cluster, cfg.train
    world = cluster.world_size
    bf16_default = training_dtype(cluster, train) == "bf16"
    if is_accelerate_config(data):
        kind = check_processes(data, path, cluster.num_nodes, world)
        if kind == "FSDP":
            return fsdp_settings(data, path, world, train.global_batch_size, train.micro_batch_size)
        if kind == "DEEPSPEED":
            ds_path = _deepspeed_file(data, path)
            if ds_path is None:
                return inline_deepspeed_settings(data, path, world, train.micro_batch_size)
            ds = read_mapping(ds_path)
            settings = deepspeed_settings(
                ds, ds_path, world, train.global_batch_size, train.micro_batch_size, bf16_default
            )
            return dataclasses.replace(settings, kind="accelerate DeepSpeed")
        return ddp_settings(data, path, world, train.global_batch_size, train.micro_batch_size)
    if is_deepspeed_config(data):
        return deepspeed_settings(
            data, path, world, train.global_batch_size, train.micro_batch_size, bf16_default
        )
    raise ConfigError(
        KEY,
        f"{path} is neither a DeepSpeed config (no zero_optimization, train_batch_size or "
        "train_micro_batch_size_per_gpu) nor an accelerate config (no distributed_type)",
    )


def run_import(cfg: Config) -> int:
    """Evaluate plan.import_from beside memplan's own plan (plan.out writes memplan's)."""
    path = cfg.plan.import_from
    assert path is not None
    if cfg.plan.plot:
        raise ConfigError("plan.plot", "not drawn with plan.import_from; plan without import")
    if cfg.plan.out:
        check_writable_file(cfg.plan.out, "plan.out")
    settings = import_settings(cfg, path)
    theirs = equivalent_plan(cfg, settings)
    own: Plan | str
    try:
        own = plan_for(settings_config(cfg, settings))
    except NoFeasiblePlan as exc:
        own = f"no feasible plan: {exc}"
    console = console_for_output()
    world = cfg.cluster.world_size
    console.print(f"{path}: {settings.kind} config, {settings.describe(world)}", highlight=False)
    columns: list[tuple[str, Plan | str]] = [
        (f"your config ({settings.kind})", theirs),
        ("memplan plan", own),
    ]
    console.print(comparison_table("predicted by memplan's cost model", columns))
    for note in settings.notes:
        console.print(f"note: {note}", highlight=False)
    if cfg.plan.out and isinstance(own, Plan):
        own.write(cfg.plan.out)
        console.print(f"wrote {cfg.plan.out}", highlight=False)
    return 0
