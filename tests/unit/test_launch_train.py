"""`memplan train` pieces in-process: the torchrun command, the run directory, refusals."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from configs.errors import ConfigError
from launch.compose import compose_config, load_resolved
from launch.plan_source import plan_for
from launch.run_dir import (
    check_not_locked,
    check_writable_dir,
    check_writable_file,
    lock_run_dir,
    pin_paths,
    prepare_run_dir,
)
from launch.train_command import (
    ERROR_FILE,
    ERROR_FILE_ENV,
    check_single_node,
    die_with_parent,
    run_torchrun,
    threads_per_worker,
    torchrun_command,
    torchrun_prefix,
    worker_env,
)
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


def test_workers_get_omp_threads_unless_the_user_set_them(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    env = worker_env(tmp_path / ERROR_FILE, nproc_per_node=2)
    assert env["OMP_NUM_THREADS"] == str(max(1, cores // 2))  # torchrun then prints no banner
    assert env[ERROR_FILE_ENV] == str(tmp_path / ERROR_FILE)
    assert threads_per_worker(10 * cores) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    assert worker_env(tmp_path / ERROR_FILE, nproc_per_node=2)["OMP_NUM_THREADS"] == "7"


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
    files = compose_config(["data.path=tokens.bin", "data.val_path=val/tokens.bin"])
    pinned = pin_paths(files, Path("r"))  # workers and requeued jobs start elsewhere
    assert pinned.data.path == str(tmp_path / "tokens.bin")
    assert pinned.data.val_path == str(tmp_path / "val" / "tokens.bin")


def test_unwritable_run_dir_is_a_config_error_with_the_real_reason(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cfg = compose_config([f"launch.run_dir={blocker}/run"])
    with pytest.raises(ConfigError, match=r"^launch.run_dir: cannot create .*/file/run: .*/file"
                       r" is a file, not a directory$"):  # fmt: skip
        prepare_run_dir(cfg, manual_plan(cfg))
    with pytest.raises(ConfigError, match=r"^launch.run_dir: .*/file is a file, not a directory$"):
        check_writable_dir(blocker, "launch.run_dir")
    assert blocker.read_text() == ""


@contextlib.contextmanager
def immutable(directory: Path):
    """No new entries in `directory`, even for root (chattr +i): what a read-only file
    system or a missing permission looks like to the probe."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
    elif subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode:
        pytest.skip("chattr +i does not work here")
    try:
        yield
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(directory)], check=True)
        directory.chmod(0o755)


def test_writability_checks_say_the_os_reason_and_create_nothing(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    with immutable(locked):
        reason = r"(Operation not permitted|Permission denied)"
        with pytest.raises(ConfigError, match=rf"^plan.out: cannot write .*/locked/a/p.json: "
                           rf"{reason} \(in .*/locked\)$"):  # fmt: skip
            check_writable_file(locked / "a" / "p.json", "plan.out")
        with pytest.raises(ConfigError, match=r"^checkpoint.dir: cannot write .*/locked/ck: "):
            check_writable_dir(locked / "ck", "checkpoint.dir")
    assert list(locked.iterdir()) == []
    with pytest.raises(ConfigError, match=r"^job.out: .* is a directory; give a file name$"):
        check_writable_file(tmp_path, "job.out")
    assert check_writable_file(tmp_path / "new" / "deeper" / "x.json", "plan.out").is_absolute()
    assert not (tmp_path / "new").exists()


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


# ------------------------------------------------------------------------------ the lock


def test_a_live_run_directory_is_refused_naming_the_holder(tmp_path):
    cfg = compose_config([f"launch.run_dir={tmp_path / 'run'}"])
    plan = manual_plan(cfg)
    with lock_run_dir(tmp_path / "run", who="memplan train") as lock:
        holder = rf"memplan train pid {os.getpid()} on host \S+"
        with pytest.raises(ConfigError, match=rf"^launch.run_dir: .*/run is in use by a live run"
                           rf" \({holder}; lock .*/run/.lock\)"):  # fmt: skip
            lock_run_dir(tmp_path / "run")
        with pytest.raises(ConfigError, match=r"^job.out: .* in use .* give another job.out$"):
            prepare_run_dir(cfg, plan, key="job.out")  # another writer: refused
        assert not (tmp_path / "run" / "resolved.yaml").exists()
        prepare_run_dir(cfg, plan, lock=lock)  # the holder writes
    check_not_locked(tmp_path / "run")  # released: free again
    with lock_run_dir(tmp_path / "run"):
        pass


def test_the_lock_ends_with_its_holder_process(tmp_path):
    run_dir = tmp_path / "run"
    code = (
        "import sys, time; from pathlib import Path; from launch.run_dir import lock_run_dir; "
        f"lock = lock_run_dir(Path({str(run_dir)!r})); print('locked', flush=True); "
        "time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"pid {holder.pid} on host"):
            check_not_locked(run_dir)
    finally:
        holder.kill()  # kill -9: no clean-up runs, the kernel drops the lock
        holder.wait()
    check_not_locked(run_dir)


# ------------------------------------------------------------------- torchrun as a child

_FAKE_WORKER = """
import os, sys
print("memplan worker output", flush=True)
print("a warning on stderr", file=sys.stderr, flush=True)
if sys.argv[1] == "bad-input":
    with open(os.environ["{env}"], "w") as f:
        f.write("data.path: token id 300 >= model.vocab_size=256\\n")
    print("Traceback (most recent call last):\\n  ChildFailedError", file=sys.stderr)
    sys.exit(1)
sys.exit(int(sys.argv[1]))
""".replace("{env}", ERROR_FILE_ENV)


@pytest.mark.parametrize(
    ("mode", "code", "stderr"),
    [
        ("0", 0, "a warning on stderr\n"),
        ("bad-input", 2, "memplan train: error: data.path: token id 300 >= model.vocab_size=256\n"),
        ("1", 1, "a warning on stderr\n"),
    ],
)
def test_torchrun_child_exit_code_and_console(tmp_path, capfd, mode, code, stderr):
    run_dir = tmp_path / "run"
    with lock_run_dir(run_dir) as lock:
        returned = run_torchrun([sys.executable, "-c", _FAKE_WORKER, mode], run_dir, lock)
    out, err = capfd.readouterr()
    assert returned == code
    assert out == "memplan worker output\n"
    if mode == "bad-input":  # the worker's line only; torchrun's traceback went to the log
        assert err.endswith(stderr) and "Traceback" not in err
        assert "Traceback" in (run_dir / "logs" / "torchrun.log").read_text()
    else:
        assert err == stderr
        assert not (run_dir / ERROR_FILE).exists()


def test_the_torchrun_child_keeps_the_run_directory_locked(tmp_path):
    run_dir = tmp_path / "run"
    probe = (
        "import sys; from pathlib import Path; from launch.run_dir import check_not_locked; "
        "from configs.errors import ConfigError\n"
        "try:\n    check_not_locked(Path(sys.argv[1]))\nexcept ConfigError:\n    sys.exit(7)"
    )
    with lock_run_dir(run_dir) as lock:
        assert run_torchrun([sys.executable, "-c", probe, str(run_dir)], run_dir, lock) == 7


def test_die_with_parent_kills_an_orphan():
    """The mechanism the worker relies on: a child that asked for SIGKILL on its parent's
    death does not outlive a parent killed with SIGKILL."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux only")
    code = (
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import signal, sys, time; "
        "from launch.train_command import die_with_parent; "
        "assert die_with_parent(signal.SIGKILL); print(flush=True); time.sleep(60)'],"
        " stdout=subprocess.PIPE, start_new_session=True)\n"
        "child.stdout.readline(); print(child.pid, flush=True); time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        with contextlib.suppress(ChildProcessError):
            os.waitpid(child, os.WNOHANG)
        time.sleep(0.05)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the child outlived its killed parent")
    assert die_with_parent(0)  # 0 clears the request again for this process
