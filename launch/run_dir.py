"""The run directory: resolved.yaml, plan.json, per-rank logs, checkpoints, the wandb run.

Workers find everything they need in it (they never run Hydra), so a torchrun command or a
job script that names the directory runs exactly what was planned, from any working directory.

Also the checks every command makes before it plans, so that bad output paths fail first
and nothing already written is touched: `check_writable_dir` / `check_writable_file` name
the real reason (a regular file in the way, a read-only file system, no permission), and
`lock_run_dir` keeps a second launcher out of a live run's directory (an OS file lock on
RUN_DIR/.lock, released by the kernel when its holders exit, even on kill -9).
"""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from configs.errors import ConfigError
from configs.schema import Config
from launch.compose import dump_resolved
from planner.plan import Plan

LOCK_FILE = ".lock"


def default_run_dir(cfg: Config) -> Path:
    """launch.run_dir, or runs/<model>-<timestamp> under the working directory."""
    if cfg.launch.run_dir:
        return Path(cfg.launch.run_dir)
    return Path("runs") / f"{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def checkpoint_dir(cfg: Config, run_dir: Path) -> Path:
    """checkpoint.dir, or <run dir>/checkpoints; absolute."""
    return (Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints").resolve()


def pin_paths(cfg: Config, run_dir: Path) -> Config:
    """The config with every path absolute and checkpoint.dir explicit, as workers must see it:
    they may start in another directory, and a restarted or requeued job must find the same
    checkpoints (checkpoint.dir defaults to <run dir>/checkpoints)."""
    run_dir = run_dir.resolve()

    def absolute(path: str | None) -> str | None:
        return str(Path(path).resolve()) if path else None

    return replace(
        cfg,
        model=replace(cfg.model, hf_config=absolute(cfg.model.hf_config)),
        data=replace(cfg.data, path=absolute(cfg.data.path), val_path=absolute(cfg.data.val_path)),
        checkpoint=replace(cfg.checkpoint, dir=str(checkpoint_dir(cfg, run_dir))),
        launch=replace(cfg.launch, run_dir=str(run_dir)),
    )


# ------------------------------------------------------------------------- writability


def _nearest_existing(path: Path) -> Path:
    """`path` or its closest ancestor that exists (/ always does)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor)


def _check_creatable(target: Path, directory: Path, key: str) -> None:
    """`target` (a file or directory) can be created under `directory`, its own directory or
    the path it will be created in; ConfigError(key) naming `target` and the real reason.
    Writes and removes one probe file in the nearest existing directory; creates nothing."""
    existing = _nearest_existing(directory)
    if not existing.is_dir():
        if existing == target:
            raise ConfigError(key, f"{target} is a file, not a directory")
        raise ConfigError(key, f"cannot create {target}: {existing} is a file, not a directory")
    try:
        handle, probe = tempfile.mkstemp(prefix=".memplan-probe-", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        where = "" if existing in (target, target.parent) else f" (in {existing})"
        raise ConfigError(key, f"cannot write {target}: {exc.strerror}{where}") from exc


def check_writable_dir(path: str | Path, key: str) -> Path:
    """The absolute `path` if a directory can be created there (or is there) and written to;
    else ConfigError(key) with the real reason (a file in the way, a read-only file system,
    no permission). Creates nothing."""
    target = Path(path).absolute()
    _check_creatable(target, target, key)
    return target


def check_writable_file(path: str | Path, key: str) -> Path:
    """The absolute `path` if a file can be written there (its directory may not exist yet);
    else ConfigError(key) with the real reason. Creates nothing."""
    target = Path(path).absolute()
    if target.is_dir():
        raise ConfigError(key, f"{target} is a directory; give a file name")
    _check_creatable(target, target.parent, key)
    if target.exists():
        try:
            os.close(os.open(target, os.O_WRONLY | os.O_APPEND))  # opens, writes nothing
        except OSError as exc:
            raise ConfigError(key, f"cannot write {target}: {exc.strerror}") from exc
    return target


# ---------------------------------------------------------------------------- the lock


def _holder(lock_path: Path) -> str:
    try:
        text = lock_path.read_text().strip()
    except OSError:
        text = ""
    return text or "another process"


def _in_use(run_dir: Path, lock_path: Path, key: str) -> ConfigError:
    return ConfigError(
        key,
        f"{run_dir} is in use by a live run ({_holder(lock_path)}; lock {lock_path}); wait for"
        f" it to end or give another {key}",
    )


class RunDirLock:
    """An exclusive flock on RUN_DIR/.lock. The file says who holds it ("memplan train pid N
    on host H"); the lock itself is the kernel's, so it ends with its last holder process."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd, self.path = fd, path

    def fileno(self) -> int:
        """The locked descriptor (pass it to a child that must keep the lock alive)."""
        return self.fd

    def release(self) -> None:
        """Unlock (the .lock file stays: removing it would race with the next locker)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> RunDirLock:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


def lock_run_dir(run_dir: Path, key: str = "launch.run_dir", who: str = "memplan") -> RunDirLock:
    """Create run_dir if needed and lock it for this process; ConfigError(key) naming the
    holder's PID and host when a live run holds it."""
    lock_path = run_dir / LOCK_FILE
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise ConfigError(key, f"cannot write {run_dir}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise _in_use(run_dir, lock_path, key) from None
    except OSError as exc:  # a file system without locks
        os.close(fd)
        raise ConfigError(key, f"cannot lock {lock_path}: {exc.strerror}") from exc
    os.ftruncate(fd, 0)
    os.write(fd, f"{who} pid {os.getpid()} on host {socket.gethostname()}\n".encode())
    return RunDirLock(fd, lock_path)


def check_not_locked(run_dir: Path, key: str = "launch.run_dir") -> None:
    """ConfigError(key) if a live run holds run_dir's lock; creates nothing."""
    lock_path = run_dir / LOCK_FILE
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return  # no lock file: nobody ever locked it (or it cannot be read: writing will say)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(run_dir, lock_path, key) from None
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- writing


def prepare_run_dir(
    cfg: Config,
    plan: Plan,
    run_dir: Path | None = None,
    key: str = "launch.run_dir",
    lock: RunDirLock | None = None,
) -> Path:
    """Create the run directory (default: default_run_dir) and write resolved.yaml and
    plan.json into it; returns its absolute path. Errors name `key`. A directory that a live
    run holds is refused, unless `lock` (this process' lock on it) is given."""
    run_dir = (run_dir or default_run_dir(cfg)).resolve()
    check_writable_dir(run_dir, key)
    if lock is None:
        check_not_locked(run_dir, key)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "resolved.yaml").write_text(dump_resolved(pin_paths(cfg, run_dir)))
        plan.write(run_dir / "plan.json")
    except OSError as exc:
        raise ConfigError(key, f"cannot write {run_dir}: {exc.strerror}") from exc
    return run_dir
