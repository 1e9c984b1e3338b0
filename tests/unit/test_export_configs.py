"""DeepSpeed / accelerate configs from plans and back (planner/deepspeed_config.py,
planner/accelerate_config.py, planner/targets.py, launch/import_command.py): every written
file is read by the target's own parser, and an imported config is predicted exactly as
the equivalent memplan plan."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import yaml

from configs.errors import ConfigError
from launch.compose import compose_config
from launch.export_command import export_files
from launch.import_command import import_settings, rewrite_import
from planner.deepspeed_config import deepspeed_config
from planner.make import make_plan
from planner.memory import predict_stage_memory
from planner.plan import LayerPlan
from planner.targets import equivalent_plan, fits, nearest_settings, settings_config
from tests.plans import manual_plan

BIG = ["model=llama3_8b", "cluster=h100_8x", "train.seq_len=8192", "train.global_batch_size=64"]


class DataParallel:
    """The mpu DeepSpeedConfig asks for the data-parallel world size (no process group)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def get_data_parallel_world_size(self) -> int:
        return self.size


def read_deepspeed(path: Path, world: int):
    """DeepSpeed's own config class on the file, as rank 0 of `world` data-parallel ranks
    (without a process group it assumes one rank: its get_rank is stood in for)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime import config as ds_config

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ds_config.dist, "get_rank", lambda *args, **kwargs: 0)
        return ds_config.DeepSpeedConfig(str(path), mpu=DataParallel(world))


def read_accelerate(path: Path):
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(path))


def layers(cfg, recompute: str = "none", anchor: float = 0.0) -> list[LayerPlan]:
    return [LayerPlan(i, 0, 0.0, recompute, 0.0, anchor) for i in range(cfg.model.num_layers)]


def hand_plan(cfg, dtype: str, zero: int, backend: str, micro: int, recompute="none", anchor=0.0):
    """The plan a config describes, built by hand (tests/plans.py), in its dtype."""
    plan = manual_plan(
        cfg,
        layers=layers(cfg, recompute, anchor),
        micro_batch_size=micro,
        dp=cfg.cluster.world_size,
        zero_stage=zero,
        zero_backend=backend,
    )
    return dataclasses.replace(plan, train=dataclasses.replace(plan.train, dtype=dtype))


def peak(plan, cfg) -> int:
    return max(rank.peak_bytes for rank in predict_stage_memory(plan, cfg))


def test_runtime_and_export_share_the_deepspeed_builder(tiny_config) -> None:
    """The runtime's engine config is planner.deepspeed_config's (one builder)."""
    import inspect

    from framework.runtime import deepspeed_backend

    assert deepspeed_backend.deepspeed_config is deepspeed_config
    assert "deepspeed_config(" in inspect.getsource(deepspeed_backend.DeepSpeedRuntime)


@pytest.mark.parametrize("zero, checkpointing", [(0, False), (2, False), (3, True)])
def test_exported_deepspeed_json_reads_with_deepspeeds_parser(tmp_path, zero, checkpointing):
    cfg = compose_config([*BIG, "train.dtype=bf16"])
    plan = hand_plan(cfg, "bf16", zero, "deepspeed", 2, "full" if checkpointing else "none")
    settings = nearest_settings(plan, cfg, "DeepSpeed", "deepspeed")
    exported = equivalent_plan(cfg, settings)
    out = tmp_path / "ds.json"
    files = export_files(compose_config([*BIG, "train.dtype=bf16"]), settings, exported, out)
    assert list(files) == [out]
    out.write_text(files[out])
    ds = read_deepspeed(out, world=8)
    lay = exported.layout
    assert ds.zero_optimization_stage == settings.zero_stage == lay.zero_stage
    assert ds.train_micro_batch_size_per_gpu == lay.micro_batch_size
    assert ds.gradient_accumulation_steps == lay.num_microbatches
    assert ds.train_batch_size == 64 == lay.micro_batch_size * lay.num_microbatches * 8
    assert ds.bfloat16_config.enabled
    assert ds.gradient_clipping == cfg.train.grad_clip
    data = json.loads(out.read_text())
    assert ("activation_checkpointing" in data) == settings.checkpointing


def test_exported_accelerate_fsdp_yaml_reads_with_accelerates_loader(tmp_path) -> None:
    cfg = compose_config(BIG)
    plan = hand_plan(cfg, "bf16", 3, "fsdp2", 1, "full")
    settings = nearest_settings(plan, cfg, "accelerate FSDP2", "fsdp2")
    exported = equivalent_plan(cfg, settings)
    out = tmp_path / "accelerate.yaml"
    cfg = compose_config([*BIG, "export.format=accelerate"])
    files = export_files(cfg, settings, exported, out)
    assert list(files) == [out]
    out.write_text(files[out])
    loaded = read_accelerate(out)
    assert loaded.distributed_type.value == "FSDP"
    assert (loaded.num_machines, loaded.num_processes) == (1, 8)
    assert loaded.mixed_precision == "bf16"
    fsdp = loaded.fsdp_config
    assert fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_reshard_after_forward"] is (settings.zero_stage == 3)
    assert fsdp["fsdp_activation_checkpointing"] is settings.checkpointing
    assert fsdp["fsdp_offload_params"] is False
    assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"


def test_exported_accelerate_deepspeed_yaml_points_at_its_json(tmp_path) -> None:
    cfg = compose_config([*BIG, "export.format=accelerate"])
    plan = hand_plan(cfg, "bf16", 1, "deepspeed", 2)
    settings = nearest_settings(plan, cfg, "accelerate DeepSpeed", "deepspeed")
    exported = equivalent_plan(cfg, settings)
    out = tmp_path / "accelerate.yaml"
    files = export_files(cfg, settings, exported, out)
    for path, text in files.items():
        path.write_text(text)
    loaded = read_accelerate(out)
    assert loaded.distributed_type.value == "DEEPSPEED"
    ds_file = Path(loaded.deepspeed_config["deepspeed_config_file"])
    assert ds_file == tmp_path / "accelerate.deepspeed.json"
    # accelerate refuses ZeRO / precision keys beside a config file: only these two
    assert set(loaded.deepspeed_config) == {"deepspeed_config_file", "zero3_init_flag"}
    assert loaded.mixed_precision is None
    assert read_deepspeed(ds_file, world=8).zero_optimization_stage == 1


def test_nearest_settings_maps_what_the_target_cannot_express() -> None:
    """A tp/sp plan with token-wise policies -> data parallel, one policy for all layers;
    the mapping is said, and the chosen one fits when an expressible one does."""
    cfg = compose_config(BIG)
    mixed = [LayerPlan(i, 0, 0.25 if i % 2 else 0.0, "none", 0.5, 0.0) for i in range(32)]
    plan = manual_plan(cfg, layers=mixed, micro_batch_size=4, dp=2, tp=2, sp=2, zero_stage=1)
    settings = nearest_settings(plan, cfg, "accelerate FSDP2", "fsdp2")
    assert settings.zero_stage == 2  # FSDP2 has no ZeRO-1
    assert settings.micro_batch_size * settings.num_microbatches * 8 == 64
    notes = " ".join(settings.notes)
    assert "tp2 pp1 sp2 -> data parallel" in notes and "one policy" in notes
    assert "ZeRO-1 -> ZeRO-2" in notes
    assert fits(equivalent_plan(cfg, settings))


# --- import: three hand-written configs, each predicted as its equivalent plan ----------


def write(path: Path, data: dict) -> str:
    path.write_text(json.dumps(data) if path.suffix == ".json" else yaml.safe_dump(data))
    return str(path)


def test_import_deepspeed_json_predicts_the_equivalent_plan(tmp_path) -> None:
    path = write(
        tmp_path / "ds_config.json",
        {
            "train_batch_size": 64,
            "train_micro_batch_size_per_gpu": 2,
            "zero_optimization": {"stage": 2, "overlap_comm": True},
            "bf16": {"enabled": True},
        },
    )
    cfg = compose_config(BIG)
    settings = import_settings(cfg, path)
    assert (settings.zero_stage, settings.micro_batch_size, settings.num_microbatches) == (2, 2, 4)
    evaluated = equivalent_plan(cfg, settings)
    hand = hand_plan(cfg, "bf16", 2, "deepspeed", 2)
    assert evaluated.memory.gpu_peak_bytes == peak(hand, cfg)


def test_import_accelerate_fsdp_yaml_predicts_the_equivalent_plan(tmp_path) -> None:
    path = write(
        tmp_path / "fsdp.yaml",
        {
            "compute_environment": "LOCAL_MACHINE",
            "distributed_type": "FSDP",
            "mixed_precision": "bf16",
            "num_machines": 1,
            "num_processes": 8,
            "fsdp_config": {
                "fsdp_version": 2,
                "fsdp_reshard_after_forward": True,
                "fsdp_activation_checkpointing": True,
                "fsdp_offload_params": False,
            },
        },
    )
    cfg = compose_config([*BIG, "train.micro_batch_size=1"])
    read_accelerate(Path(path))  # accelerate accepts the hand-written file too
    settings = import_settings(cfg, path)
    evaluated = equivalent_plan(cfg, settings)
    hand = hand_plan(cfg, "bf16", 3, "fsdp2", 1, "full")
    assert evaluated.memory.gpu_peak_bytes == peak(hand, settings_config(cfg, settings))
    assert evaluated.layout.num_microbatches == 8


def test_import_accelerate_deepspeed_yaml_reads_its_json(tmp_path) -> None:
    write(
        tmp_path / "zero3.json",
        {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 2,
            "zero_optimization": {"stage": 3},
            "bf16": {"enabled": "auto"},
            "activation_checkpointing": {"cpu_checkpointing": True},
        },
    )
    path = write(
        tmp_path / "accelerate.yaml",
        {
            "distributed_type": "DEEPSPEED",
            "num_machines": 1,
            "num_processes": 8,
            "deepspeed_config": {"deepspeed_config_file": "zero3.json", "zero3_init_flag": True},
        },
    )
    cfg = compose_config(BIG)
    settings = import_settings(cfg, path)  # the JSON is found beside the YAML
    assert settings.kind == "accelerate DeepSpeed" and settings.global_batch_size == 16
    assert settings.dtype == "bf16"  # auto: the cluster's (cuda: bf16)
    evaluated = equivalent_plan(cfg, settings)
    hand = hand_plan(cfg, "bf16", 3, "deepspeed", 1, "full", anchor=1.0)
    assert evaluated.memory.gpu_peak_bytes == peak(hand, settings_config(cfg, settings))
    assert evaluated.memory.host_bytes_per_node > 0  # the layer inputs live on the host


def test_export_then_import_round_trips(tmp_path) -> None:
    cfg = compose_config([*BIG, "export.format=accelerate", "export.accelerate_backend=deepspeed"])
    plan = hand_plan(cfg, "bf16", 3, "fsdp2", 2, "full")
    settings = nearest_settings(plan, cfg, "accelerate DeepSpeed", "deepspeed")
    exported = equivalent_plan(cfg, settings)
    out = tmp_path / "acc.yaml"
    for path, text in export_files(cfg, settings, exported, out).items():
        path.write_text(text)
    back = import_settings(cfg, str(out))
    assert dataclasses.replace(back, notes=()) == dataclasses.replace(settings, notes=())
    assert equivalent_plan(cfg, back).memory == exported.memory


@pytest.mark.parametrize(
    "data, words",
    [
        ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage=4"),
        (
            {
                "train_batch_size": 60,
                "train_micro_batch_size_per_gpu": 2,
                "gradient_accumulation_steps": 4,
            },
            "train_batch_size=60 != train_micro_batch_size_per_gpu=2",
        ),
        ({"zero_optimization": {"stage": 2}}, "needs train_batch_size or"),
        ({"distributed_type": "FSDP", "num_processes": 4}, "num_processes=4"),
        ({"distributed_type": "TPU"}, "distributed_type='TPU'"),
        (
            {
                "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}},
                "train_batch_size": 64,
            },
            "offload_param.device='cpu'",
        ),
        ({"foo": 1}, "neither a DeepSpeed config"),
    ],
)
def test_bad_configs_name_the_file_and_key(tmp_path, data, words) -> None:
    path = write(tmp_path / "bad.json", data)
    with pytest.raises(ConfigError) as caught:
        import_settings(compose_config(BIG), path)
    message = str(caught.value)
    assert words in message and path in message and "\n" not in message


def test_import_keyword_is_rewritten_to_the_schema_key() -> None:
    assert rewrite_import(["import=a.json", "model=tiny"]) == [
        "plan.import_from=a.json",
        "model=tiny",
    ]


def test_a_plan_with_states_in_host_ram_exports_and_imports_with_offload(tmp_path):
    one_a800 = ["model=llama2_13b", "cluster=a800_8x", "cluster.gpus_per_node=1",
                "train.seq_len=4096", "train.global_batch_size=8",
                "train.micro_batch_size=1"]  # fmt: skip
    cfg = compose_config([*one_a800, "export.format=accelerate"])
    plan = make_plan(cfg, explain=False)
    assert plan.layout.state_offload == "all"
    settings = nearest_settings(plan, cfg, "accelerate FSDP2", "fsdp2")
    assert settings.state_offload
    exported = equivalent_plan(cfg, settings)
    assert fits(exported) and exported.layout.state_offload == "all"
    out = tmp_path / "accelerate.yaml"
    out.write_text(export_files(cfg, settings, exported, out)[out])
    assert read_accelerate(out).fsdp_config["fsdp_offload_params"] is True
    imported = import_settings(cfg, str(out))
    assert imported.state_offload
    again = equivalent_plan(cfg, imported)
    assert again.memory.host_bytes_per_node == exported.memory.host_bytes_per_node
    # DeepSpeed: offload_optimizer, which DeepSpeed's own config class reads back
    ds_cfg = compose_config([*one_a800, "export.format=deepspeed"])
    deepspeed = nearest_settings(plan, ds_cfg, "DeepSpeed", "deepspeed")
    assert deepspeed.state_offload and deepspeed.zero_stage >= 2
    ds_plan = equivalent_plan(ds_cfg, deepspeed)
    assert ds_plan.layout.state_offload == "optimizer" and fits(ds_plan)
    ds_out = tmp_path / "ds.json"
    ds_out.write_text(export_files(ds_cfg, deepspeed, ds_plan, ds_out)[ds_out])
    parsed = read_deepspeed(ds_out, 1)
    assert parsed.zero_config.offload_optimizer.device == "cpu"
    assert import_settings(ds_cfg, str(ds_out)).state_offload
