"""Checkpoints in one process: exact resume, lazy snapshots, atomic commits, damage, faults."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from configs.errors import ConfigError
from framework.components.checkpoint import storage
from framework.components.checkpoint.staging import HostSnapshot
from framework.runtime import build_local_runtime
from framework.trainer import train
from launch.compose import compose_config
from tests.plans import manual_plan

CKPT_LOGGER = "framework.components.checkpoint.checkpointer"


def _cfg(tiny_config, steps: int = 8, **checkpoint):
    """8 steps of 4 sequences x 32 tokens; every step logged (so every loss is compared)."""
    return dataclasses.replace(
        tiny_config,
        train=dataclasses.replace(
            tiny_config.train, steps=steps, seq_len=32, global_batch_size=4, warmup_steps=2
        ),
        logging=dataclasses.replace(tiny_config.logging, every=1),
        checkpoint=dataclasses.replace(tiny_config.checkpoint, **checkpoint),
    )


def _run(cfg, run_dir: Path, **checkpoint):
    if checkpoint:
        cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, **checkpoint))
    return train(cfg, manual_plan(cfg), run_dir)


def _committed_steps(root: Path) -> list[int]:
    return [step for step, _ in storage.list_committed(root)]


def _errors(caplog) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == CKPT_LOGGER and r.levelname == "ERROR"
    ]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Losses of 8 uninterrupted steps (the reference every resumed run must reproduce)."""
    cfg = _cfg(compose_config(["logging.wandb=false"]))
    return _run(cfg, tmp_path_factory.mktemp("straight")).losses


@pytest.fixture(scope="module")
def first_half(tmp_path_factory):
    """A run directory after steps 1-4 of 8 (checkpoint every 2 steps) and their losses."""
    cfg = _cfg(compose_config(["logging.wandb=false"]), every=2)
    run_dir = tmp_path_factory.mktemp("first_half")
    return run_dir, _run(cfg, run_dir, exit_after=4).losses


def _copy_of(first_half, tmp_path: Path) -> tuple[Path, dict[int, float]]:
    run_dir, losses = first_half
    shutil.copytree(run_dir / "checkpoints", tmp_path / "checkpoints")
    return tmp_path, losses


# ---------------------------------------------------------------------------- exact resume


def test_stop_and_resume_reproduces_the_straight_run_bitwise(
    tiny_config, tmp_path, straight, first_half
):
    run_dir, first = _copy_of(first_half, tmp_path)
    assert sorted(first) == [1, 2, 3, 4]
    assert _committed_steps(run_dir / "checkpoints") == [4, 2]
    second = _run(_cfg(tiny_config, every=2), run_dir)
    assert second.start_step == 4
    assert sorted(second.losses) == [5, 6, 7, 8]
    assert {**first, **second.losses} == straight  # bitwise: floats compared with ==


def test_sync_mode_checkpoints_resume_bitwise_too(tiny_config, tmp_path, straight):
    cfg = _cfg(tiny_config, every=3, async_mode="sync")
    first = _run(cfg, tmp_path, exit_after=5)
    assert _committed_steps(tmp_path / "checkpoints") == [5, 3]  # every 3, and the last
    second = _run(cfg, tmp_path)
    assert second.start_step == 5
    assert {**first.losses, **second.losses} == straight


def test_resume_none_starts_fresh(tiny_config, tmp_path, straight, first_half):
    run_dir, _ = _copy_of(first_half, tmp_path)
    fresh = _run(_cfg(tiny_config, every=2), run_dir, resume="none", exit_after=2)
    assert fresh.start_step == 0
    assert fresh.losses == {1: straight[1], 2: straight[2]}


def test_checkpoint_holds_the_pre_update_state_while_its_copy_lags(
    tiny_config, tmp_path, straight, monkeypatch
):
    """The host copy is still running when the next optimizer step comes: that step must
    wait for it (the runtime's pre-update hook), or the checkpoint mixes two steps."""
    original = HostSnapshot._copy_cpu

    def slow_copy(self, pairs):
        time.sleep(0.3)  # far longer than a tiny step's forward/backward
        original(self, pairs)

    monkeypatch.setattr(HostSnapshot, "_copy_cpu", slow_copy)
    cfg = _cfg(tiny_config, every=2)
    _run(cfg, tmp_path, exit_after=3)
    # Resume from step 2's checkpoint: step 3's optimizer step ran while it was copied.
    shutil.rmtree(tmp_path / "checkpoints" / "step_000000003")
    monkeypatch.setattr(HostSnapshot, "_copy_cpu", original)
    resumed = _run(cfg, tmp_path)
    assert resumed.start_step == 2
    assert resumed.losses == {s: straight[s] for s in range(3, 9)}


def test_local_runtime_calls_pre_update_hooks_once_before_writing_state(tiny_config):
    cfg = _cfg(tiny_config)
    runtime = build_local_runtime(
        cfg.model, cfg.train, manual_plan(cfg), torch.device("cpu"), torch.float32
    )
    seen = []

    def hook():
        params = [p.detach().clone() for p in runtime.model.parameters()]
        steps = [s["step"].item() for s in runtime.optimizer.state.values()]
        seen.append((params, steps))

    runtime.pre_update_hooks.append(hook)
    inputs = torch.randint(0, 256, (4, 32))
    for expected_step in (0, 1):
        before = [p.detach().clone() for p in runtime.model.parameters()]
        runtime.train_step(inputs, inputs)
        params_at_hook, steps_at_hook = seen[-1]
        assert len(seen) == expected_step + 1
        assert all(torch.equal(a, b) for a, b in zip(before, params_at_hook, strict=True))
        assert steps_at_hook == [float(expected_step)] * len(steps_at_hook)
        after = list(runtime.model.parameters())
        assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_host_snapshot_waits_for_its_copy_and_reuses_buffers(monkeypatch):
    source = {"w": torch.arange(1_000_000, dtype=torch.float32), "meta": {"lr": 0.5}}
    release = threading.Event()
    original = HostSnapshot._copy_cpu

    def gated_copy(self, pairs):
        release.wait(5)
        original(self, pairs)

    monkeypatch.setattr(HostSnapshot, "_copy_cpu", gated_copy)
    snapshot = HostSnapshot(pin_memory=False)
    host = snapshot.stage(source)
    source["meta"]["lr"] = 0.1  # plain values are captured at stage time
    waiter = threading.Thread(target=snapshot.wait_for_source_writes)
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive(), "the pre-update wait returned before the copy read the source"
    release.set()
    waiter.join(5)
    source["w"].add_(1.0)  # the optimizer step, after the wait
    snapshot.wait_ready()
    assert torch.equal(host["w"], torch.arange(1_000_000, dtype=torch.float32))
    assert host["meta"]["lr"] == 0.5
    again = snapshot.stage(source)
    snapshot.wait_ready()
    assert again["w"].data_ptr() == host["w"].data_ptr()
    assert torch.equal(again["w"], source["w"])


# ------------------------------------------------------------------------ commit protocol


def test_commit_record_covers_every_file_and_old_commits_are_pruned(tiny_config, tmp_path):
    cfg = _cfg(tiny_config, every=2, keep=2)
    _run(cfg, tmp_path)
    root = tmp_path / "checkpoints"
    assert _committed_steps(root) == [8, 6]
    assert not [p for p in root.iterdir() if not p.name.startswith("step_")]
    newest = root / "step_000000008"
    record = storage.read_commit(newest)
    on_disk = {p.name for p in newest.iterdir()} - {storage.COMMIT_FILE}
    assert set(record["files"]) == on_disk
    assert {"plan.json", "config.json", "train_state.json", "rank_00000.pt", ".metadata"} <= on_disk
    assert record["step"] == 8 and record["world_size"] == 1
    assert storage.verify_files(newest, record, record["files"]) == []


def test_damaged_checkpoints_are_reported_once_each_and_an_older_one_used(
    tiny_config, tmp_path, straight, caplog
):
    cfg = _cfg(tiny_config, every=2, keep=4)
    _run(cfg, tmp_path)
    root = tmp_path / "checkpoints"
    assert _committed_steps(root) == [8, 6, 4, 2]
    data = root / "step_000000008" / "__0_0.distcp"
    os.truncate(data, data.stat().st_size // 2)  # a short write
    data = root / "step_000000006" / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one flipped bit, same size
    data.write_bytes(bytes(raw))
    (root / "step_000000004" / storage.COMMIT_FILE).unlink()  # no commit record
    partial = root / ".tmp-step_000000010-deadbeef"  # what a crash mid-persist leaves
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"partial")
    caplog.set_level("INFO")
    resumed = _run(cfg, tmp_path)
    errors = _errors(caplog)
    assert len(errors) == 3, errors
    names = ["step_000000008", "step_000000006", "step_000000004"]
    for error, name in zip(errors, names, strict=True):
        assert error.startswith(f"checkpoint {name} is damaged"), error
    assert resumed.start_step == 2
    assert resumed.losses == {s: straight[s] for s in range(3, 9)}
    for step in (8, 6, 4):
        assert len(list(root.glob(f"corrupt-step_{step:09d}-*"))) == 1
    assert not partial.exists()
    assert _committed_steps(root) == [8, 6, 4, 2]  # retrained and committed again


# ---------------------------------------------------------------------------------- faults


@contextlib.contextmanager
def _unwritable(directory: Path):
    """No new entries in `directory`: chattr +i as root (root ignores modes), else 0o555."""
    root_user = os.geteuid() == 0
    if root_user:
        made = subprocess.run(["chattr", "+i", str(directory)], capture_output=True, check=False)
        if made.returncode:
            pytest.skip(f"cannot make a directory unwritable here: {made.stderr.decode()}")
    else:
        directory.chmod(0o555)
    try:
        with pytest.raises(OSError):
            (directory / "probe").mkdir()
        yield
    finally:
        if root_user:
            subprocess.run(["chattr", "-i", str(directory)], check=True)
        else:
            directory.chmod(0o755)


def _assert_intact(root: Path, steps: list[int]) -> None:
    assert _committed_steps(root) == steps
    for _, directory in storage.list_committed(root):
        record = storage.read_commit(directory)
        assert storage.verify_files(directory, record, record["files"]) == []


def _warnings(caplog) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == CKPT_LOGGER and r.levelname == "WARNING"
    ]


def test_unwritable_directory_training_continues_error_said_once_then_a_summary(
    tiny_config, tmp_path, straight, first_half, caplog
):
    run_dir, _ = _copy_of(first_half, tmp_path)
    root = run_dir / "checkpoints"
    caplog.set_level("INFO")
    with _unwritable(root):
        resumed = _run(_cfg(tiny_config, every=2), run_dir)
    assert resumed.losses == {s: straight[s] for s in range(5, 9)}
    errors = _errors(caplog)
    assert len(errors) == 1, errors  # attempts after steps 6 and 8: one cause, said once
    assert int(errors[0].split()[2]) == 6
    assert "not permitted" in errors[0] or "denied" in errors[0], errors
    summary, final = _warnings(caplog)[-2:]
    assert summary.startswith("checkpoint: 2 of 2 saves failed (2x rank 0: "), summary
    assert summary.endswith(f"newest committed checkpoint: step 4 ({root / 'step_000000004'})")
    assert final == "warning: the final checkpoint (step 8) failed: a rerun resumes from step 4"
    _assert_intact(root, [4, 2])


class _DiskFullAfter(io.FileIO):
    """A file on a disk with `budget` bytes left: the write that needs more fails ENOSPC."""

    budget = 64 * 1024

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if self.tell() + size > self.budget:
            super().write(memoryview(data).cast("B")[: max(0, self.budget - self.tell())])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.name)
        return super().write(data)


def test_disk_full_training_continues_error_logged_once_and_partial_files_removed(
    tiny_config, tmp_path, straight, first_half, caplog, monkeypatch
):
    from torch.distributed.checkpoint.filesystem import FileSystem

    run_dir, _ = _copy_of(first_half, tmp_path)
    root = run_dir / "checkpoints"
    real_create_stream = FileSystem.create_stream

    @contextlib.contextmanager
    def full_disk_stream(self, path, mode):
        if "w" not in mode:
            with real_create_stream(self, path, mode) as stream:
                yield stream
            return
        with _DiskFullAfter(path, mode) as stream:
            yield stream

    monkeypatch.setattr(FileSystem, "create_stream", full_disk_stream)
    caplog.set_level("INFO")
    resumed = _run(_cfg(tiny_config, every=2), run_dir)
    assert resumed.losses == {s: straight[s] for s in range(5, 9)}
    errors = _errors(caplog)
    assert len(errors) == 1, errors  # the same cause twice (different files): said once
    assert "No space left on device" in errors[0], errors
    summary, final = _warnings(caplog)[-2:]
    assert summary.startswith("checkpoint: 2 of 2 saves failed (2x rank 0: No space left on")
    assert "step 4" in summary and final.startswith("warning: the final checkpoint (step 8)")
    assert not list(root.glob(".tmp-*")), "a failed attempt's partial files stay behind"
    _assert_intact(root, [4, 2])


def test_all_checkpoints_damaged_is_said_and_old_corrupt_copies_are_pruned(
    tiny_config, tmp_path, straight, first_half, caplog
):
    run_dir, _ = _copy_of(first_half, tmp_path)
    root = run_dir / "checkpoints"
    for old in ("corrupt-step_000000001-aaaaaaaa", "corrupt-step_000000003-bbbbbbbb"):
        (root / old).mkdir()  # left by earlier resumes
    for step in (2, 4):
        (root / f"step_{step:09d}" / storage.COMMIT_FILE).write_text("{")
    caplog.set_level("INFO")
    cfg = _cfg(tiny_config, every=0, keep=2)
    resumed = _run(cfg, run_dir)
    assert resumed.start_step == 0 and resumed.losses == straight
    assert _warnings(caplog)[0] == (
        f"no intact checkpoint in {root} (2 damaged, kept as corrupt-*); starting at step 1"
    )
    kept = sorted(p.name.split("-")[1] for p in root.glob("corrupt-*"))
    assert kept == ["step_000000002", "step_000000004"]  # checkpoint.keep=2, the newest


# ---------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("override", "key"),
    [
        (["checkpoint.async_mode=process_pool"], "checkpoint.async_mode"),
        (["checkpoint.exit_after=4"], "checkpoint.exit_after"),
        (["checkpoint.exit_after=-1", "checkpoint.every=2"], "checkpoint.exit_after"),
        (["checkpoint.dir= "], "checkpoint.dir"),
    ],
)
def test_bad_checkpoint_settings_are_rejected(override, key):
    with pytest.raises(ConfigError) as error:
        compose_config(override)
    assert error.value.key == key
