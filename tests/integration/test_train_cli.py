"""`memplan train` as a user runs it: torchrun on this node, the dry-run command, bad input.

Also holds the helpers the job tests share (running the CLI, writing plans, reading losses).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from launch.compose import compose_config
from planner.plan import Plan
from tests.cli import memplan
from tests.plans import manual_plan

# 4 sequences x 32 tokens = 128 tokens per step, 3 steps: a few seconds per torchrun on 2 cores
TINY = [
    "train.steps=3",
    "train.seq_len=32",
    "train.global_batch_size=4",
    "logging.every=1",
    "logging.wandb=false",
]
_LOSS = re.compile(r"step (\d+) \| loss (\d+\.\d+) \|")


def write_plan(path: Path, overrides: list[str], **layout: object) -> Path:
    """A hand-made plan (tests/plans.py) for the config the overrides describe."""
    manual_plan(compose_config(overrides), **layout).write(path)
    return path


def losses(console: str) -> dict[int, str]:
    """Losses of the metrics lines (`step N | loss X.XXXX | ...`), as printed."""
    return {int(step): loss for step, loss in _LOSS.findall(console)}


def rank_logs(run_dir: Path, world_size: int) -> list[Path]:
    """The log each worker writes, run_dir/logs/rank<R>.log, for ranks 0..world_size-1."""
    found = [run_dir / "logs" / f"rank{rank}.log" for rank in range(world_size)]
    for log in found:
        assert log.is_file(), f"no {log}"
    return found


def free_port() -> int:
    """A TCP port nobody listens on right now (for a rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.mark.integration
@pytest.mark.slow
def test_memplan_train_without_overrides_is_the_demo_job(tmp_path):
    """What `make demo` runs: the tiny model on the embedded corpus, 300 steps, the last loss
    at least 30% below the first (how fast is bench/ and BENCHMARKS.md's business)."""
    done = memplan("train", cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    found = {step: float(loss) for step, loss in losses(done.stdout).items()}
    assert max(found) == 300 and min(found) == 1
    assert found[300] <= 0.7 * found[1], (found[1], found[300])
    assert list((tmp_path / "runs").glob("*/wandb/offline-run-*"))  # wandb on, offline


@pytest.mark.integration
@pytest.mark.distributed
@pytest.mark.slow
def test_dry_run_prints_the_command_that_trains_the_same(tmp_path):
    nproc = 2  # two ranks (dp=2) on this node
    cluster = [f"cluster.gpus_per_node={nproc}"]
    plan = write_plan(tmp_path / "plan.json", [*TINY, *cluster], dp=nproc)
    # wandb on: the run directory also holds the offline wandb run
    overrides = [*TINY, *cluster, f"plan.path={plan}", "logging.wandb=true"]

    dry = memplan("train", *overrides, "launch.dry_run=true", f"launch.run_dir={tmp_path / 'a'}")
    assert dry.returncode == 0, dry.stderr
    (line,) = dry.stdout.strip().splitlines()
    command = shlex.split(line)
    assert f"--nproc-per-node={nproc}" in command and "--standalone" in command
    assert command[-3:] == ["-m", "launch.worker", str(tmp_path / "a")]
    assert not (tmp_path / "a" / "logs").exists()  # a dry run starts nothing
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    printed = subprocess.run(
        command, capture_output=True, text=True, cwd=elsewhere, timeout=300, check=False
    )
    direct = memplan("train", *overrides, f"launch.run_dir={tmp_path / 'b'}")

    assert printed.returncode == 0, printed.stdout[-3000:] + printed.stderr[-3000:]
    assert direct.returncode == 0, direct.stdout[-3000:] + direct.stderr[-3000:]
    assert sorted(losses(direct.stdout)) == [1, 2, 3]
    assert losses(printed.stdout) == losses(direct.stdout)
    assert direct.stdout.startswith(f"run directory: {tmp_path / 'b'}\n")
    assert "[default" not in direct.stdout + direct.stderr  # rank 0 only, and unprefixed
    assert any(line.startswith("step 3 | loss") for line in direct.stdout.splitlines())
    for run_dir in (tmp_path / "a", tmp_path / "b"):
        assert {p.name for p in run_dir.iterdir()} >= {"resolved.yaml", "plan.json", "logs"}
        (rank0, *_) = rank_logs(run_dir, nproc)
        assert "step 3 | loss" in rank0.read_text()
        assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


@pytest.fixture(scope="module")
def two_rank_plan(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plans") / "dp2.json"
    return write_plan(path, [*TINY, "cluster.gpus_per_node=2"], dp=2)


@pytest.fixture(scope="module")
def odd_token_file() -> Iterator[Path]:
    """Three bytes: not a whole number of uint16 tokens (a fixed path, outside tmp_path,
    which the test checks stays empty)."""
    path = Path("/tmp/memplan-odd-tokens.bin")
    path.write_bytes(b"abc")
    yield path
    path.unlink(missing_ok=True)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["frobnicate"], "unknown command 'frobnicate'; allowed: plan, train, profile, job"),
        (["train", "launch.nope=1"], "launch.nope: unknown key"),
        (["train", "plan.path=/nonexistent/plan.json"], "plan.path: cannot read"),
        (["train", *TINY, "PLAN"], "plan.path: plan needs 2 ranks (dp*tp*pp*sp) but the cluster"),
        (
            ["train", *TINY, "PLAN", "cluster.num_nodes=2"],
            "cluster.num_nodes: 2 nodes: memplan train runs on this node only; use memplan job",
        ),
        (["train", *TINY, "data.path=/nonexistent/tokens.bin"], "data.path: no such token file"),
        (["train", *TINY, "data.path=ODD"], "data.path: /tmp/memplan-odd-tokens.bin is not a flat"),
        (["train", *TINY, "train.eval_every=1"], "train.eval_every: 1 needs data.val_path"),
        (["train", *TINY, "data.val_path=ODD"], "data.val_path: /tmp/memplan-odd-tokens.bin is"),
        (["job", *TINY, "PLAN"], "plan.path: plan needs 2 ranks"),
        (["job", "job.scheduler=pbs"], "job.scheduler"),
        (["job", "job.time=tomorrow"], "job.time: 'tomorrow' is not a SLURM time"),
    ],
    ids=lambda value: "-".join(value)[:40] if isinstance(value, list) else None,
)
def test_bad_input_is_exit_2_and_one_line(tmp_path, two_rank_plan, odd_token_file, args, expected):
    args = [f"plan.path={two_rank_plan}" if arg == "PLAN" else arg for arg in args]
    args = [arg.replace("=ODD", f"={odd_token_file}") for arg in args]
    args += [f"launch.run_dir={tmp_path / 'run'}"] if args[0] == "train" else []
    done = memplan(*args, cwd=tmp_path)
    line = _one_line_error(done)
    assert line.startswith("memplan")
    assert expected in line
    assert list(tmp_path.iterdir()) == []  # refused before writing anything


@pytest.mark.integration
def test_validation_loss_lines_before_the_first_step_and_after_each(tmp_path):
    """One rank, 3 steps, eval every step: `eval N | loss X.XXXX` for N = 0, 1, 2, 3, each
    before the next step's metrics line (the val file: 6 windows of 33 bytes, uint16)."""
    val_path = tmp_path / "val.bin"
    (np.arange(6 * 33 + 5) % 251).astype(np.uint16).tofile(val_path)
    run_dir = tmp_path / "run"
    done = memplan(
        "train", *TINY, f"data.val_path={val_path}", "train.eval_every=1",
        f"launch.run_dir={run_dir}", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith(("eval ", "step "))]
    assert [line.split(" |")[0] for line in lines] == [
        "eval 0", "step 1", "eval 1", "step 2", "eval 2", "step 3", "eval 3",
    ]  # fmt: skip
    evals = [line for line in lines if line.startswith("eval ")]
    assert all(re.fullmatch(r"eval \d \| loss \d+\.\d{4}", line) for line in evals), evals
    assert "eval 3 | loss " in (run_dir / "logs" / "rank0.log").read_text()


@pytest.mark.integration
@pytest.mark.distributed
@pytest.mark.slow
def test_the_console_is_quiet_and_the_rank_logs_hold_everything(tmp_path):
    """Two DeepSpeed ranks: no torchrun OMP banner, no DeepSpeed probe or accelerator lines,
    no per-step FutureWarnings on the console; rank 0's log has every console line, and each
    distinct Python warning once."""
    cluster = ["cluster.gpus_per_node=2"]
    plan = write_plan(
        tmp_path / "plan.json", [*TINY, *cluster], dp=2, zero_stage=3, zero_backend="deepspeed"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    done = memplan(
        "train", *TINY, *cluster, f"plan.path={plan}", f"launch.run_dir={tmp_path / 'r'}", env=env
    )
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-3000:]
    assert sorted(losses(done.stdout)) == [1, 2, 3]
    for noise in ("OMP_NUM_THREADS", "Warning", "gcc ", "[WARNING]", "accelerator"):
        assert noise not in console, console[-3000:]
    (rank0, _) = rank_logs(tmp_path / "r", 2)
    log = rank0.read_text().splitlines()
    assert set(done.stdout.splitlines()[1:]) <= set(log)  # all but "run directory: ..."
    warned = [line for line in log if "Warning: " in line]
    assert len(warned) == len(set(warned))


@pytest.mark.integration
def test_without_plan_path_train_and_job_plan_for_the_cluster(tmp_path):
    overrides = [*TINY, "cluster.gpus_per_node=2"]
    dry = memplan("train", *overrides, "launch.dry_run=true", f"launch.run_dir={tmp_path / 'a'}")
    assert dry.returncode == 0, dry.stderr
    plan = Plan.read(tmp_path / "a" / "plan.json")
    assert plan.layout.world_size == 2
    assert plan.solver.name != "manual"  # made by the planner, not tests/plans.py
    assert "--nproc-per-node=2" in shlex.split(dry.stdout)

    job = memplan("job", *overrides, f"job.out={tmp_path / 'j' / 'job.sh'}")
    assert job.returncode == 0, job.stderr
    assert Plan.read(tmp_path / "j" / "plan.json").layout == plan.layout  # the same planner
    assert "NPROC_PER_NODE=2\n" in (tmp_path / "j" / "job.sh").read_text()


@pytest.mark.integration
@pytest.mark.slow
def test_worker_bad_input_is_the_workers_line_and_a_finished_run_says_so(tmp_path):
    """An error only a worker can find (the checkpoint's seed is not train.seed) is exit 2
    with the worker's one line, not torchrun's traceback; rerunning a finished run says
    there is nothing left to do."""
    overrides = [*TINY, "train.steps=2", "checkpoint.every=1", f"launch.run_dir={tmp_path / 'r'}"]
    first = memplan("train", *overrides, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    again = memplan("train", *overrides, cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "nothing left to do: the checkpoint is at step 2 and train.steps=2" in again.stdout
    assert not losses(again.stdout)

    reseeded = memplan("train", *overrides, "train.steps=3", "train.seed=1", cwd=tmp_path)
    line = _one_line_error(reseeded)
    assert line == "memplan train: error: train.seed: checkpoint was written with seed 0, not 1"
    assert "Traceback" not in reseeded.stdout and "memplan worker" not in reseeded.stdout
    log = (tmp_path / "r" / "logs" / "torchrun.log").read_text()
    assert "ChildFailedError" in log  # torchrun's report stays in the log


@pytest.mark.integration
@pytest.mark.slow
def test_kill_9_of_the_launchers_process_group_ends_its_workers(tmp_path):
    """torchrun starts workers in sessions of their own; they must not outlive the launcher."""
    import psutil

    run_dir = tmp_path / "r"
    script = Path(sys.executable).parent / "memplan"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "launch.cli"]
    args = [*TINY, "train.steps=100000", "logging.every=1", f"launch.run_dir={run_dir}"]
    launcher = subprocess.Popen(
        [*command, "train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        for line in launcher.stdout:
            if line.startswith("step 1 |"):
                break
        workers = [  # not torchrun, whose command line names launch.worker too
            p for p in psutil.Process(launcher.pid).children(recursive=True)
            if "-m launch.worker" in " ".join(p.cmdline()) and "torchrun" not in p.cmdline()[1]
        ]  # fmt: skip
        # the cause: outside the launcher's session, kill -9 of its group does not reach them
        assert workers and all(os.getsid(w.pid) != launcher.pid for w in workers)
        second = memplan("train", *args, "launch.dry_run=true", cwd=tmp_path)
        assert f"in use by a live run (memplan train pid {launcher.pid} on host" in _one_line_error(
            second
        )
    finally:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=30)
    _, alive = psutil.wait_procs(workers, timeout=20)
    assert not alive, f"workers outlived the launcher: {alive}"
