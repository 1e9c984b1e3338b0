"""`memplan train`: plan (or reuse plan.path), write the run directory, run torchrun.

Everything that can be checked here is checked before the run directory is written or
torchrun starts (exit 2, one line): the output directories, the training tokens, this
machine's devices, the plan, and that no live run holds the run directory.

torchrun runs standalone on this node with the plan's world size: every rank's stdout and
stderr go to RUN_DIR/logs/<run id>/attempt_<n>/<local rank>/, and the console shows rank 0.
The launcher stays while it runs:
- it holds RUN_DIR/.lock (torchrun inherits it), so a second launcher is refused;
- it is torchrun's parent, and torchrun gets SIGTERM if the launcher dies (workers get
  SIGKILL if torchrun dies: launch/worker.py), so kill -9 of the launcher ends the run;
- it copies torchrun's stderr to the console and to RUN_DIR/logs/torchrun.log, except once a
  worker has reported bad input (RUN_DIR/error.txt): then the console gets that worker's one
  line and exit code 2, and torchrun's traceback stays in the log.
Several nodes need `memplan job` (SLURM, or per-node torchrun commands).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import os
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

from configs.errors import ConfigError
from configs.schema import ClusterConfig, Config
from configs.tokens import check_ids_fit_model, check_training_tokens, token_file
from launch.compose import compose_config, warn_config
from launch.plan_source import plan_for
from launch.run_dir import (
    RunDirLock,
    check_not_locked,
    check_writable_dir,
    checkpoint_dir,
    default_run_dir,
    lock_run_dir,
    prepare_run_dir,
)

ERROR_FILE = "error.txt"
ERROR_FILE_ENV = "MEMPLAN_ERROR_FILE"
"""Set by the launcher: where a worker writes its one-line bad-input error (launch/worker.py)."""
_PR_SET_PDEATHSIG = 1


def torchrun_prefix() -> list[str]:
    """How to start torchrun with this Python (the one memplan is installed in): the
    `torchrun` script beside the interpreter, else `python -m torch.distributed.run`."""
    script = Path(sys.executable).parent / "torchrun"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "torch.distributed.run"]


def redirect_other_local_ranks(nproc_per_node: int) -> list[str]:
    """torchrun flags sending the raw stdout/stderr of local ranks 1.. to files in --log-dir.

    Local rank 0 keeps the console without torchrun's `[default0]:` prefix (which --tee would
    add), so metrics lines start with `step N | loss`; every worker also writes its own
    RUN_DIR/logs/rank<R>.log (launch/worker.py).
    """
    if nproc_per_node == 1:
        return []
    return ["--redirects=" + ",".join(f"{rank}:3" for rank in range(1, nproc_per_node))]


def torchrun_command(run_dir: Path, nproc_per_node: int, max_restarts: int) -> list[str]:
    """torchrun on this node: every rank logs to run_dir/logs, the console shows rank 0."""
    return [
        *torchrun_prefix(),
        "--standalone",
        f"--nproc-per-node={nproc_per_node}",
        f"--max-restarts={max_restarts}",
        f"--log-dir={run_dir / 'logs'}",
        *redirect_other_local_ranks(nproc_per_node),
        "-m", "launch.worker", str(run_dir),
    ]  # fmt: skip


def check_single_node(cluster: ClusterConfig) -> None:
    """`memplan train` runs every rank on this machine: refuse what cannot run here."""
    if cluster.num_nodes > 1:
        raise ConfigError(
            "cluster.num_nodes",
            f"{cluster.num_nodes} nodes: memplan train runs on this node only; use memplan job"
            " (job.scheduler=slurm, or job.scheduler=torchrun without SLURM)",
        )
    if cluster.device == "cuda":
        import torch  # only here: the CPU path never pays for importing torch in the launcher

        found = torch.cuda.device_count()
        if found < cluster.gpus_per_node:
            raise ConfigError(
                "cluster.gpus_per_node",
                f"{cluster.gpus_per_node} but this machine has {found} CUDA device(s)",
            )


def check_validation_tokens(cfg: Config) -> None:
    """ConfigError when validation cannot run: train.eval_every > 0 without data.val_path,
    or a data.val_path that is not a readable token file of data.dtype, holds less than one
    window (train.seq_len + 1 tokens) or a token id >= model.vocab_size."""
    data, seq_len, vocab_size = cfg.data, cfg.train.seq_len, cfg.model.vocab_size
    if data.val_path is None:
        if cfg.train.eval_every > 0:
            raise ConfigError(
                "train.eval_every",
                f"{cfg.train.eval_every} needs data.val_path=TOKENS.bin (validation tokens)",
            )
        return
    try:  # read as data.path is: same data.dtype (or its metadata's, for auto)
        found = token_file(dataclasses.replace(data, path=data.val_path))
    except ConfigError as exc:  # the same checks as data.path's, named for this key
        raise ConfigError("data.val_path", str(exc).removeprefix(f"{exc.key}: ")) from exc
    assert found is not None  # a path was given
    if found.num_tokens < seq_len + 1:
        raise ConfigError(
            "data.val_path",
            f"{data.val_path} holds {found.num_tokens} tokens, less than one window: "
            f"train.seq_len={seq_len} needs >= {seq_len + 1}",
        )
    check_ids_fit_model(found, "data.val_path", vocab_size, cfg.model.hf_config)


def check_run_inputs(cfg: Config, run_dir: Path) -> None:
    """What the workers would otherwise find only after start-up: the run and checkpoint
    directories can be written, the tokens fit the model and sequence, the devices exist,
    and no live run holds the run directory."""
    check_single_node(cfg.cluster)
    check_training_tokens(cfg.data, cfg.train.seq_len, cfg.model.vocab_size, cfg.model.hf_config)
    check_validation_tokens(cfg)
    check_writable_dir(run_dir, "launch.run_dir")
    check_not_locked(run_dir)
    if cfg.checkpoint.every > 0:
        check_writable_dir(checkpoint_dir(cfg, run_dir), "checkpoint.dir")


# ------------------------------------------------------------------------ process life


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def die_with_parent(signum: int) -> bool:
    """Ask the kernel to send `signum` to this process when its parent dies (Linux
    PR_SET_PDEATHSIG; kept across exec). False where that is not available."""
    libc = _libc()
    try:
        return libc is not None and libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except AttributeError:  # a libc without prctl
        return False


def _torchrun_dies_with_the_launcher() -> None:  # runs in the child between fork and exec
    die_with_parent(signal.SIGTERM)  # torchrun's handler stops its workers


def _copy_stderr(
    source: IO[bytes], log: IO[bytes], error_file: Path, stopping: threading.Event
) -> None:
    """torchrun's stderr (its agent and local rank 0) to the log, and to the console until a
    worker has reported bad input or the launcher was told to stop: what torchrun prints
    after that is its traceback about it."""
    console: IO[bytes] | None = sys.stderr.buffer
    for line in iter(source.readline, b""):  # keeps reading whatever fails: a full pipe
        with contextlib.suppress(OSError):  # would block torchrun and rank 0
            log.write(line)
            log.flush()
        if console is None or stopping.is_set() or error_file.exists():
            continue
        try:
            console.write(line)
            console.flush()
        except OSError:  # the console went away (a closed pipe): the log still gets it
            console = None


def worker_error(error_file: Path) -> str | None:
    """The one-line error a worker reported, if any."""
    try:
        lines = error_file.read_text().strip().splitlines()
    except OSError:
        return None
    return lines[0] if lines else None


def threads_per_worker(nproc_per_node: int) -> int:
    """OpenMP threads for each of a node's workers: the cores this process may use, shared."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // nproc_per_node)


def worker_env(error_file: Path, nproc_per_node: int) -> dict[str, str]:
    """The environment torchrun and its workers get. OMP_NUM_THREADS is the user's, else
    threads_per_worker: unset, torchrun would set 1 itself and print a banner asking for it."""
    env = {**os.environ, ERROR_FILE_ENV: str(error_file)}
    env.setdefault("OMP_NUM_THREADS", str(threads_per_worker(nproc_per_node)))
    return env


def run_torchrun(
    command: list[str], run_dir: Path, lock: RunDirLock, nproc_per_node: int = 1
) -> int:
    """Run torchrun as a child and return the command's exit code: 2 with the worker's line
    on stderr when a worker stopped on bad input, else torchrun's own exit code."""
    error_file = run_dir / ERROR_FILE
    error_file.unlink(missing_ok=True)
    log_path = run_dir / "logs" / "torchrun.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = worker_env(error_file, nproc_per_node)
    sys.stdout.flush()
    _libc()  # loaded here, not in the forked child
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command,
            stderr=subprocess.PIPE,
            env=env,
            pass_fds=(lock.fileno(),),  # the lock lives as long as torchrun does
            preexec_fn=_torchrun_dies_with_the_launcher,  # before any thread starts
        )
        assert process.stderr is not None
        stopping = threading.Event()
        received: list[int] = []
        copier = threading.Thread(
            target=_copy_stderr, args=(process.stderr, log, error_file, stopping), daemon=True
        )
        copier.start()

        def forward(signum: int, _frame: object) -> None:
            stopping.set()
            received.append(signum)
            if signum != signal.SIGINT:  # Ctrl-C reaches torchrun from the terminal itself
                process.send_signal(signum)

        handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        previous = {signum: signal.signal(signum, forward) for signum in handled}
        try:
            returncode = process.wait()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        copier.join(timeout=10)  # EOF once torchrun and its workers are gone
    if returncode == 0:
        return 0
    line = worker_error(error_file)
    if line is not None:
        print(f"memplan train: error: {line}", file=sys.stderr)
        return 2
    if received:
        name = signal.Signals(received[0]).name
        print(f"memplan train: stopped by {name}; torchrun's report: {log_path}", file=sys.stderr)
        return 128 + received[0]
    return returncode


def run(args: list[str]) -> int:
    """Compose, check, plan, write the run directory, then run torchrun (its exit code is the
    command's). launch.dry_run=true prints the command instead."""
    cfg = compose_config(args)
    warn_config(cfg)
    run_dir = default_run_dir(cfg).resolve()
    check_run_inputs(cfg, run_dir)  # before planning: nothing is written if these fail
    plan = plan_for(cfg, single_node=True)  # memplan train runs on this node only
    command = torchrun_command(run_dir, plan.layout.world_size, cfg.launch.max_restarts)
    with lock_run_dir(run_dir, who="memplan train") as lock:
        prepare_run_dir(cfg, plan, run_dir, lock=lock)
        if cfg.launch.dry_run:
            print(shlex.join(command))
            return 0
        print(f"run directory: {run_dir}", flush=True)
        return run_torchrun(command, run_dir, lock, plan.layout.world_size)
