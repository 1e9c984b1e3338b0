"""A DeepSpeed config JSON from a plan, and a plan's settings from a DeepSpeed config JSON.

`deepspeed_config` is THE builder: memplan's own DeepSpeed runtime
(framework/runtime/deepspeed_backend.py) passes its result to deepspeed.initialize, and
`memplan export export.format=deepspeed` writes it, so an exported file is what memplan runs.
Plain data only (no torch, no deepspeed import).

`deepspeed_settings` reads a user's DeepSpeed config the way DeepSpeed does
(deepspeed/runtime/config.py, _set_batch_related_parameters): any two of
train_batch_size, train_micro_batch_size_per_gpu and gradient_accumulation_steps determine
the third (train_batch_size = micro x accumulation x data-parallel world), all three must
agree, and "auto" (the Hugging Face Trainer's placeholder) is filled from memplan's train.*.
An "activation_checkpointing" section means every layer is checkpointed (the user's model
calls deepspeed.checkpointing.checkpoint per layer; the section only configures it), with
cpu_checkpointing keeping the checkpointed layer inputs in host memory.
"""

from __future__ import annotations

from typing import Any

from configs.errors import ConfigError
from planner.plan import Plan
from planner.targets import TargetSettings

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
RECOGNISED_KEYS = (*BATCH_KEYS, "zero_optimization", "bf16", "fp16")
"""A JSON object with any of these top-level keys is read as a DeepSpeed config."""


def activation_checkpointing_section(cpu_checkpointing: bool) -> dict[str, Any]:
    """deepspeed.checkpointing's settings for a model that checkpoints every layer (data
    parallel only: nothing to partition over a model-parallel group)."""
    return {
        "partition_activations": False,
        "cpu_checkpointing": cpu_checkpointing,
        "contiguous_memory_optimization": False,
        "synchronize_checkpoint_boundary": False,
        "profile": False,
    }


def deepspeed_config(
    plan: Plan, grad_clip: float, bf16: bool, clip_in_deepspeed: bool = True
) -> dict[str, Any]:
    """The DeepSpeed engine configuration of a data-parallel plan (tp = pp = sp = 1).

    grad_clip: train.grad_clip (0: off); clip_in_deepspeed=False leaves clipping to the
    caller (memplan's runtime clips itself under ZeRO-0 in fp32, where DeepSpeed reports no
    gradient norm). The activation_checkpointing section appears when every layer of the plan
    is fully recomputed (what DeepSpeed's checkpointing expresses).
    """
    layout = plan.layout
    config: dict[str, Any] = {
        # micro x accumulation x dp = the global batch
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.num_microbatches,
        "train_batch_size": layout.micro_batch_size * layout.num_microbatches * layout.dp,
        "gradient_clipping": grad_clip if clip_in_deepspeed else 0.0,
        "zero_optimization": {
            "stage": layout.zero_stage,
            # ZeRO-3's own linear keeps the parameter, not the gathered weight, for backward;
            # token-wise recomputation inside backward then finds it released (measured).
            "memory_efficient_linear": all(layer.keeps_everything for layer in plan.layers),
        },
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # a torch optimizer (memplan's: torch's AdamW)
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if all(layer.recompute == "full" for layer in plan.layers):
        host_inputs = all(layer.anchor_offload_fraction == 1.0 for layer in plan.layers)
        config["activation_checkpointing"] = activation_checkpointing_section(host_inputs)
    if layout.state_offload == "optimizer":
        # ZeRO-Offload: master weights, moments and the gradient partition in host RAM, the
        # step on the CPU (pinned host memory needs CUDA: set by the runtime on CPU hosts)
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        # the client optimizer (torch's AdamW, fused on the CPU) instead of DeepSpeedCPUAdam:
        # the same update as without offload
        config["zero_force_ds_cpu_optimizer"] = False
    return config


def is_deepspeed_config(data: dict[str, Any]) -> bool:
    """Whether a parsed JSON/YAML mapping looks like a DeepSpeed config."""
    return any(key in data for key in RECOGNISED_KEYS)


def _positive_int(data: dict[str, Any], key: str, where: str) -> int | None:
    """data[key] as a positive int; None when absent or "auto"."""
    value = data.get(key)
    if value is None or value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError("plan.import_from", f"{where}: {key}={value!r}; allowed: an integer >= 1")
    return value


def _enabled(data: dict[str, Any], key: str, where: str, auto: bool) -> bool:
    section = data.get(key, {})
    if not isinstance(section, dict):
        raise ConfigError(
            "plan.import_from", f"{where}: {key} must be an object like {{enabled: true}}"
        )
    value = section.get("enabled", False)
    if value == "auto":
        return auto
    if not isinstance(value, bool):
        raise ConfigError(
            "plan.import_from", f"{where}: {key}.enabled={value!r}; allowed: true, false, auto"
        )
    return value


def batch_sizes(
    data: dict[str, Any],
    where: str,
    world: int,
    global_batch: int,
    micro_batch: int | None,
) -> tuple[int, int, int]:
    """(micro, accumulation, global) as DeepSpeed derives them on `world` data-parallel ranks;
    "auto" takes global_batch (train.global_batch_size) and micro_batch
    (train.micro_batch_size)."""
    total, micro, accum = (_positive_int(data, key, where) for key in BATCH_KEYS)
    if data.get("train_batch_size") == "auto":
        total = global_batch
    if data.get("train_micro_batch_size_per_gpu") == "auto":
        micro = micro_batch
    key = "plan.import_from"
    if total is None and micro is None:
        raise ConfigError(
            key,
            f"{where}: needs train_batch_size or train_micro_batch_size_per_gpu (DeepSpeed's rule)",
        )
    if accum is None:  # DeepSpeed: derived from the other two, else 1
        both = total is not None and micro is not None
        accum = max(1, total // (micro * world)) if both else 1  # type: ignore[operator]
    if micro is None:
        assert total is not None
        micro = max(1, total // (accum * world))
    if total is None:
        total = micro * accum * world
    if total != micro * accum * world:
        raise ConfigError(
            key,
            f"{where}: train_batch_size={total} != train_micro_batch_size_per_gpu={micro} x "
            f"gradient_accumulation_steps={accum} x {world} GPUs (cluster.num_nodes x "
            f"cluster.gpus_per_node) = {micro * accum * world}",
        )
    return micro, accum, total


def deepspeed_settings(
    data: dict[str, Any],
    where: str,
    world: int,
    global_batch: int,
    micro_batch: int | None,
    bf16_default: bool,
) -> TargetSettings:
    """The settings of a DeepSpeed config (see the module doc); ConfigError under
    plan.import_from naming `where` (the file) and the key for anything it cannot evaluate."""
    key = "plan.import_from"
    zero = data.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(key, f"{where}: zero_optimization must be an object like {{stage: 2}}")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ConfigError(key, f"{where}: zero_optimization.stage={stage!r}; allowed: 0, 1, 2, 3")
    devices = {}
    for part in ("offload_optimizer", "offload_param"):
        section = zero.get(part)
        devices[part] = section.get("device", "none") if isinstance(section, dict) else section
    param_device, optimizer_device = devices["offload_param"], devices["offload_optimizer"]
    if param_device not in (None, "none"):
        raise ConfigError(
            key,
            f"{where}: zero_optimization.offload_param.device={param_device!r}; memplan models"
            " offload_optimizer only (ZeRO-Infinity's parameter offload not yet); allowed: none",
        )
    if optimizer_device not in (None, "none", "cpu") or (optimizer_device == "cpu" and stage < 2):
        raise ConfigError(
            key,
            f"{where}: zero_optimization.offload_optimizer.device={optimizer_device!r} at"
            f" stage {stage}; memplan models offload_optimizer to the cpu at stage 2 or 3;"
            " allowed: none, or cpu with stage 2 or 3",
        )
    micro, accum, total = batch_sizes(data, where, world, global_batch, micro_batch)
    fp16 = _enabled(data, "fp16", where, auto=False)
    bf16 = _enabled(data, "bf16", where, auto=bf16_default)
    if fp16 and bf16:
        raise ConfigError(
            key, f"{where}: fp16.enabled and bf16.enabled are both true; allowed: one"
        )
    checkpointing = data.get("activation_checkpointing")
    if checkpointing is not None and not isinstance(checkpointing, dict):
        raise ConfigError(key, f"{where}: activation_checkpointing must be an object")
    notes = []
    if fp16:
        notes.append("fp16 is evaluated as bf16 (the same bytes per value)")
    return TargetSettings(
        kind="DeepSpeed",
        state_offload=optimizer_device == "cpu",
        zero_stage=stage,
        zero_backend="deepspeed",
        micro_batch_size=micro,
        num_microbatches=accum,
        global_batch_size=total,
        dtype="bf16" if (bf16 or fp16) else "fp32",
        checkpointing=checkpointing is not None,
        host_layer_inputs=bool((checkpointing or {}).get("cpu_checkpointing", False)),
        notes=tuple(notes),
    )
