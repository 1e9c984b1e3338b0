"""An accelerate config (the YAML `accelerate launch --config_file` reads) from settings, and
settings from a user's accelerate config. Plain data only (no accelerate import: the tests
load every file written with accelerate's own loader).

Two kinds, as accelerate has them:
- FSDP, fsdp_version 2 (torch FSDP2): fsdp_reshard_after_forward true = ZeRO-3, false =
  ZeRO-2 (parameters stay gathered from a layer's forward to its backward);
  fsdp_activation_checkpointing checkpoints every transformer layer,
  fsdp_activation_checkpointing_offload keeps their inputs in host memory;
  fsdp_offload_params = the plan's state_offload (FSDP2's CPUOffloadPolicy: parameters,
  gradients and optimizer state in host RAM, the step on the CPU);
  mixed_precision bf16 or no. fsdp_version 1's fsdp_sharding_strategy is read too
  (FULL_SHARD = ZeRO-3, SHARD_GRAD_OP = ZeRO-2, NO_SHARD = ZeRO-0).
- DEEPSPEED with deepspeed_config_file: the DeepSpeed JSON holds everything (ZeRO stage,
  batch sizes, bf16); accelerate refuses mixed_precision or ZeRO keys beside a config file,
  so the YAML names only the file and zero3_init_flag. Inline deepspeed_config keys
  (zero_stage, gradient_accumulation_steps, offload_*_device) are read on import.
An accelerate config holds no micro-batch size (the training script sets it): importing
an FSDP one needs train.micro_batch_size.
"""

from __future__ import annotations

from typing import Any

from configs.errors import ConfigError
from planner.targets import TargetSettings

KEY = "plan.import_from"
FSDP_STRATEGIES = {"FULL_SHARD": 3, "SHARD_GRAD_OP": 2, "NO_SHARD": 0, 1: 3, 2: 2, 3: 0}
"""fsdp_version 1 sharding strategies (names or accelerate's numbers) -> ZeRO stage."""
DISTRIBUTED_TYPES = ("FSDP", "DEEPSPEED", "MULTI_GPU", "MULTI_CPU", "NO")


def accelerate_config(
    settings: TargetSettings, num_machines: int, num_processes: int, deepspeed_file: str | None
) -> dict[str, Any]:
    """The accelerate config: DEEPSPEED pointing at `deepspeed_file` when given, else FSDP
    version 2 (settings.zero_stage 2 or 3)."""
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "debug": False,
        "machine_rank": 0,  # each node's launch sets its own (--machine_rank)
        "main_training_function": "main",
        "num_machines": num_machines,
        "num_processes": num_processes,  # all machines together
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": False,
    }
    if deepspeed_file is not None:
        config["distributed_type"] = "DEEPSPEED"
        config["deepspeed_config"] = {
            "deepspeed_config_file": deepspeed_file,
            "zero3_init_flag": settings.zero_stage == 3,
        }
        return config
    if settings.zero_stage not in (2, 3):
        raise ValueError(f"FSDP expresses ZeRO-2/3, not ZeRO-{settings.zero_stage}")
    config["distributed_type"] = "FSDP"
    config["mixed_precision"] = "bf16" if settings.dtype == "bf16" else "no"
    config["fsdp_config"] = {
        "fsdp_version": 2,
        "fsdp_reshard_after_forward": settings.zero_stage == 3,
        "fsdp_activation_checkpointing": settings.checkpointing,
        "fsdp_activation_checkpointing_offload": settings.checkpointing
        and settings.host_layer_inputs,
        "fsdp_offload_params": settings.state_offload,
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # the model's _no_split_modules
        "fsdp_state_dict_type": "SHARDED_STATE_DICT",
        "fsdp_cpu_ram_efficient_loading": False,
    }
    return config


def is_accelerate_config(data: dict[str, Any]) -> bool:
    """Whether a parsed YAML/JSON mapping looks like an accelerate config."""
    return "distributed_type" in data


def _bool(section: dict[str, Any], key: str, default: bool, where: str) -> bool:
    value = section.get(key, default)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise ConfigError(KEY, f"{where}: {key}={value!r}; allowed: true, false")
    return value


def _count(data: dict[str, Any], key: str, expected: int, cluster_keys: str, where: str) -> None:
    value = data.get(key, expected)
    if value == -1 and key == "num_processes":  # accelerate: every GPU
        return
    if value != expected:
        raise ConfigError(
            KEY, f"{where}: {key}={value!r} but the cluster has {expected} ({cluster_keys}); "
            f"set {cluster_keys.split(' x ')[-1]} or the file's {key}",
        )  # fmt: skip


def _mixed_precision(data: dict[str, Any], where: str) -> tuple[str, list[str]]:
    value = data.get("mixed_precision") or "no"
    if value not in ("no", "bf16", "fp16"):
        raise ConfigError(KEY, f"{where}: mixed_precision={value!r}; allowed: no, bf16, fp16")
    if value == "fp16":
        return "bf16", ["fp16 is evaluated as bf16 (the same bytes per value)"]
    return ("bf16" if value == "bf16" else "fp32"), []


def _accumulation(global_batch: int, micro: int | None, world: int, where: str) -> int:
    if micro is None:
        raise ConfigError(
            "train.micro_batch_size",
            f"{where} holds no batch size (the training script sets it); give the sequences per "
            "GPU per forward, e.g. train.micro_batch_size=1",
        )
    if global_batch % (micro * world):
        raise ConfigError(
            "train.global_batch_size",
            f"{global_batch} is not a multiple of train.micro_batch_size={micro} x {world} GPUs "
            f"(what {where} trains with)",
        )
    return global_batch // (micro * world)


def fsdp_settings(
    data: dict[str, Any], where: str, world: int, global_batch: int, micro: int | None
) -> TargetSettings:
    """Settings of an accelerate FSDP config."""
    fsdp = data.get("fsdp_config") or {}
    if not isinstance(fsdp, dict):
        raise ConfigError(KEY, f"{where}: fsdp_config must be a mapping")
    version = fsdp.get("fsdp_version", 1)
    if version not in (1, 2):
        raise ConfigError(KEY, f"{where}: fsdp_config.fsdp_version={version!r}; allowed: 1, 2")
    if version == 2:
        zero = 3 if _bool(fsdp, "fsdp_reshard_after_forward", True, where) else 2
    else:  # version 1 names a sharding strategy (older accelerate: fsdp_sharding_strategy)
        strategy = fsdp.get(
            "fsdp_sharding_strategy", fsdp.get("fsdp_reshard_after_forward", "FULL_SHARD")
        )
        if strategy not in FSDP_STRATEGIES:
            allowed = "FULL_SHARD, SHARD_GRAD_OP, NO_SHARD"
            raise ConfigError(
                KEY, f"{where}: fsdp_config.fsdp_sharding_strategy={strategy!r}; allowed: {allowed}"
            )
        zero = FSDP_STRATEGIES[strategy]
    state_offload = _bool(fsdp, "fsdp_offload_params", False, where)
    if state_offload and zero < 2:
        raise ConfigError(
            KEY, f"{where}: fsdp_config.fsdp_offload_params=true with NO_SHARD; memplan models"
            " FSDP's model-state offload at ZeRO-2/3 (SHARD_GRAD_OP, FULL_SHARD); allowed: false",
        )  # fmt: skip
    checkpointing = _bool(fsdp, "fsdp_activation_checkpointing", False, where)
    host = _bool(fsdp, "fsdp_activation_checkpointing_offload", False, where)
    dtype, notes = _mixed_precision(data, where)
    if version == 1:
        notes.append("fsdp_version 1 is evaluated with memplan's FSDP2 (per-parameter) accounting")
    return TargetSettings(
        kind=f"accelerate FSDP{version}",
        zero_stage=zero,
        zero_backend="fsdp2",
        micro_batch_size=micro or 0,
        num_microbatches=_accumulation(global_batch, micro, world, where),
        global_batch_size=global_batch,
        dtype=dtype,
        checkpointing=checkpointing,
        host_layer_inputs=checkpointing and host,
        state_offload=state_offload,
        notes=tuple(notes),
    )


def inline_deepspeed_settings(
    data: dict[str, Any], where: str, world: int, micro: int | None
) -> TargetSettings:
    """Settings of an accelerate DEEPSPEED config without a deepspeed_config_file: the
    global batch is micro (train.micro_batch_size) x its gradient_accumulation_steps x GPUs."""
    ds = data.get("deepspeed_config") or {}
    stage = ds.get("zero_stage", 2)  # accelerate's default
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ConfigError(
            KEY, f"{where}: deepspeed_config.zero_stage={stage!r}; allowed: 0, 1, 2, 3"
        )
    if ds.get("offload_param_device", "none") not in ("none", None):
        raise ConfigError(
            KEY, f"{where}: deepspeed_config.offload_param_device="
            f"{ds['offload_param_device']!r}; memplan models offload_optimizer only; allowed: none",
        )  # fmt: skip
    optimizer_device = ds.get("offload_optimizer_device", "none")
    if optimizer_device not in ("none", None, "cpu") or (optimizer_device == "cpu" and stage < 2):
        raise ConfigError(
            KEY, f"{where}: deepspeed_config.offload_optimizer_device={optimizer_device!r} at"
            f" zero_stage {stage}; allowed: none, or cpu with zero_stage 2 or 3",
        )  # fmt: skip
    accum = ds.get("gradient_accumulation_steps", 1)
    if isinstance(accum, bool) or not isinstance(accum, int) or accum < 1:
        raise ConfigError(
            KEY,
            f"{where}: deepspeed_config.gradient_accumulation_steps={accum!r}; allowed: an "
            "integer >= 1",
        )
    if micro is None:
        _accumulation(1, None, world, where)  # raises: names train.micro_batch_size
    assert micro is not None
    dtype, notes = _mixed_precision(data, where)
    return TargetSettings(
        kind="accelerate DeepSpeed",
        zero_stage=stage,
        zero_backend="deepspeed",
        micro_batch_size=micro,
        num_microbatches=accum,
        global_batch_size=micro * accum * world,
        dtype=dtype,
        checkpointing=False,
        state_offload=optimizer_device == "cpu",
        notes=tuple(notes),
    )


def check_processes(data: dict[str, Any], where: str, num_nodes: int, world: int) -> str:
    """The distributed_type, after checking it and the process counts against the cluster."""
    kind = data.get("distributed_type")
    if kind not in DISTRIBUTED_TYPES:
        raise ConfigError(
            KEY, f"{where}: distributed_type={kind!r}; allowed: {', '.join(DISTRIBUTED_TYPES)}"
        )
    _count(data, "num_machines", num_nodes, "cluster.num_nodes", where)
    _count(data, "num_processes", world, "cluster.num_nodes x cluster.gpus_per_node", where)
    return kind


def ddp_settings(
    data: dict[str, Any], where: str, world: int, global_batch: int, micro: int | None
) -> TargetSettings:
    """MULTI_GPU / MULTI_CPU / NO: plain data parallelism (ZeRO-0)."""
    dtype, notes = _mixed_precision(data, where)
    if dtype == "bf16":
        notes.append(
            "DDP under bf16 autocast keeps fp32 weights: memplan counts bf16 weights with fp32 "
            "master copies, so the prediction is low by about 2 bytes per parameter"
        )
    return TargetSettings(
        kind=f"accelerate {data['distributed_type']}",
        zero_stage=0,
        zero_backend="fsdp2",
        micro_batch_size=micro or 0,
        num_microbatches=_accumulation(global_batch, micro, world, where),
        global_batch_size=global_batch,
        dtype=dtype,
        checkpointing=False,
        notes=tuple(notes),
    )
