"""`memplan train` pieces in-process: the torchrun command, the run directory, refusals."""

import sys
from pathlib import Path

import pytest

from configs.errors import ConfigError
from launch.compose import compose_config, load_resolved
from launch.plan_source import plan_for
from launch.run_dir import pin_paths, prepare_run_dir
from launch.train_command import check_single_node, torchrun_command, torchrun_prefix
from planner.plan import Plan
from tests.plans import manual_plan


def test_torchrun_command_runs_every_rank_here_and_shows_rank_0(tmp_path):
    command = torchrun_command(tmp_path, nproc_per_node=4, max_restarts=2)
    assert command == [
        *torchrun_prefix(),
        "--standalone",
        "--nproc-per-node=4",
        "--max-restarts=2",
        f"--log-dir={tmp_path / 'logs'}",
        "--redirects=1:3,2:3,3:3",
        "-m",
        "launch.worker",
        str(tmp_path),
    ]


def test_torchrun_is_the_one_of_this_python():
    prefix = torchrun_prefix()
    if len(prefix) == 1:
        assert Path(prefix[0]) == Path(sys.executable).parent / "torchrun"
    else:
        assert prefix == [sys.executable, "-m", "torch.distributed.run"]


def test_run_dir_holds_what_workers_read_with_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tokens.bin").write_bytes(b"\0" * 8192)
    cfg = compose_config(
        ["logging.wandb=false", "data.path=tokens.bin", "launch.run_dir=runs/a", "train.steps=7"]
    )
    plan = manual_plan(cfg)
    run_dir = prepare_run_dir(cfg, plan)
    assert run_dir == tmp_path / "runs" / "a"
    resolved = load_resolved(str(run_dir / "resolved.yaml"))
    assert resolved.data.path == str(tmp_path / "tokens.bin")
    assert resolved.checkpoint.dir == str(run_dir / "checkpoints")
    assert resolved.launch.run_dir == str(run_dir)
    assert resolved.train == cfg.train
    assert Plan.read(run_dir / "plan.json") == plan


def test_pin_paths_keeps_absolute_paths_and_resolves_relative_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose_config(["checkpoint.dir=/abs/ckpt"])
    assert pin_paths(cfg, Path("r")).checkpoint.dir == "/abs/ckpt"
    cfg = compose_config(["checkpoint.dir=rel/ckpt"])
    pinned = pin_paths(cfg, Path("r"))
    assert pinned.checkpoint.dir == str(tmp_path / "rel" / "ckpt")
    assert pinned.launch.run_dir == str(tmp_path / "r")
    assert pinned.data.path is None  # the embedded corpus stays the embedded corpus


def test_unwritable_run_dir_is_a_config_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cfg = compose_config([f"launch.run_dir={blocker}/run"])
    with pytest.raises(ConfigError, match=r"^launch.run_dir: cannot write"):
        prepare_run_dir(cfg, manual_plan(cfg))


def test_a_plan_for_another_world_size_is_refused(tmp_path):
    two = compose_config(["cluster.gpus_per_node=2"])
    manual_plan(two, dp=2).write(tmp_path / "plan.json")
    one = compose_config([f"plan.path={tmp_path / 'plan.json'}"])
    with pytest.raises(ConfigError, match=r"^plan.path: plan needs 2 ranks .* has 1"):
        plan_for(one)
    assert plan_for(compose_config([f"plan.path={tmp_path / 'plan.json'}",
                                    "cluster.gpus_per_node=2"])).layout.dp == 2  # fmt: skip


def test_train_refuses_several_nodes():
    with pytest.raises(ConfigError, match=r"^cluster.num_nodes: 2 nodes: .*memplan job"):
        check_single_node(compose_config(["cluster.num_nodes=2"]).cluster)
    check_single_node(compose_config(["cluster.gpus_per_node=2"]).cluster)  # one node: fine


def test_train_refuses_more_gpus_than_this_machine_has():
    import torch

    cluster = compose_config(["cluster=h100_8x"]).cluster
    if torch.cuda.device_count() >= cluster.gpus_per_node:
        pytest.skip("this machine has 8 CUDA devices")
    with pytest.raises(ConfigError, match=r"^cluster.gpus_per_node: 8 but this machine has"):
        check_single_node(cluster)
