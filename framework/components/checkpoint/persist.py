"""Persisting one checkpoint: every rank writes its shard with torch.distributed.checkpoint,
then rank 0 commits (storage.commit). Runs on the checkpoint's own gloo group, in a
background thread (async modes) or in the training thread (sync mode).

Every rank goes through the same collectives whatever fails locally, so a failure on one
rank (unwritable directory, disk full) fails the attempt on all ranks instead of hanging
them; the attempt's temporary directory is removed and older commits are untouched.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem

from framework.components.checkpoint.staging import StateDict
from framework.components.checkpoint.storage import (
    FileRecord,
    checksum_file,
    commit,
    make_tmp_dir,
    retain,
    write_durably,
)

logger = logging.getLogger(__name__)

# DCP warns on every single-process save and load; one process is a supported case here.
warnings.filterwarnings(
    "ignore", message="torch.distributed is disabled, unavailable or uninitialized"
)


class Collectives:
    """The few object collectives the protocol needs, on one group (None: single process)."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.rank = dist.get_rank(group) if group is not None else 0
        self.world_size = dist.get_world_size(group) if group is not None else 1

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's obj on every rank."""
        if self.group is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group)
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's obj, in rank order."""
        if self.group is None:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj, group=self.group)
        return gathered


def describe(exc: BaseException) -> str:
    """One line for a failed save: the OS error and path, or the first failing rank's error."""
    if isinstance(exc, CheckpointException):
        for rank, failure in sorted(exc.failures.items()):
            inner = failure[0] if isinstance(failure, tuple) else failure
            return f"rank {rank}: {describe(inner)}"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    cause = exc.__cause__
    if cause is not None:
        return f"{exc}: {describe(cause)}"
    return f"{type(exc).__name__}: {exc}"


class _RecordingStream:
    """A DCP output stream that checksums what passes through it (so files need not be read
    back) and remembers the OS errors its writes hit."""

    def __init__(self, stream: Any, errors: list[OSError]) -> None:
        self._stream, self._errors = stream, errors
        self.crc, self.size, self.sequential = 0, 0, True

    def write(self, data: Any) -> int:
        try:
            written = self._stream.write(data)
        except OSError as exc:
            self._errors.append(exc)
            raise
        view = memoryview(data).cast("B")
        self.crc = zlib.crc32(view[:written] if written is not None else view, self.crc)
        self.size += len(view) if written is None else written
        return written

    def seek(self, *args: Any) -> int:
        self.sequential = False  # the running CRC no longer describes the file
        return self._stream.seek(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _RecordingFileSystem(FileSystem):
    """DCP's file system, keeping a CRC32 of every file written sequentially and the first OS
    error of a write: torch.save turns a failed write into an opaque zip-writer error
    ("unexpected pos ..."), losing e.g. ENOSPC."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[OSError] = []
        self.records: dict[str, FileRecord] = {}

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[Any]:
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with super().create_stream(path, mode) as stream:
            recording = _RecordingStream(stream, self.errors)
            yield recording
        if recording.sequential and os.path.getsize(path) == recording.size:
            self.records[Path(path).name] = FileRecord(recording.size, f"{recording.crc:08x}")

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        super().rename(path, new_path)
        record = self.records.pop(Path(path).name, None)
        if record is not None:
            self.records[Path(new_path).name] = record


@dataclass
class PersistJob:
    """One checkpoint to write."""

    step: int
    state: StateDict
    """What DCP writes: the host snapshot (async modes) or the live state (sync mode)."""
    ready: Callable[[], None]
    """Blocks until `state` is complete (the snapshot's copy); raises if it failed."""
    files: dict[str, bytes]
    """Files this rank writes besides DCP's (its RNG state; rank 0 also the run's)."""
    num_bytes: int = 0
    """Tensor bytes of this rank's state (for the log line)."""


@dataclass
class PersistOutcome:
    """How an attempt ended, the same on every rank."""

    step: int
    path: Path | None
    """The committed directory; None when the attempt failed."""
    error: str | None
    """One line: the first failure (which rank, what); None on success."""
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)


def _own_records(
    tmp: Path, rank: int, names: list[str], known: dict[str, FileRecord]
) -> dict[str, FileRecord]:
    # DCP names this rank's data files __<rank>_<n>.distcp; rank 0 later adds whatever
    # nobody claimed (e.g. .metadata), so every file is covered whatever DCP names them.
    # Files checksummed while written are not read back.
    own = set(names) | {p.name for p in tmp.glob(f"__{rank}_*")}
    return {name: known.get(name) or checksum_file(tmp / name) for name in sorted(own)}


def persist(job: PersistJob, root: Path, keep: int, comm: Collectives) -> PersistOutcome:
    """Write, checksum and commit one checkpoint (collective over comm)."""
    start = time.perf_counter()
    rank = comm.rank

    def failed(error: str, tmp: Path | None) -> PersistOutcome:
        if tmp is not None and rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # every rank is past its last use of it
        return PersistOutcome(job.step, None, error, time.perf_counter() - start)

    # [1] rank 0 creates the temporary directory; its name or the error goes to every rank
    tmp, error = None, None
    if rank == 0:
        try:
            tmp = make_tmp_dir(root, job.step)
        except OSError as exc:
            error = f"rank 0: {describe(exc)}"
    tmp, error = comm.broadcast((tmp, error))
    if error is not None:
        return failed(error, None)

    # [2] every rank writes its own files and waits for its snapshot to be complete
    known: dict[str, FileRecord] = {}
    try:
        for name, data in job.files.items():
            write_durably(tmp / name, data)
            known[name] = FileRecord(len(data), f"{zlib.crc32(data):08x}")
        job.ready()
    except Exception as exc:
        error = f"rank {rank}: {describe(exc)}"
    errors = [e for e in comm.all_gather(error) if e]
    if errors:
        return failed(errors[0], tmp)

    # [3] the sharded state; DCP reports a failure on any rank to every rank
    writer = FileSystemWriter(tmp, single_file_per_rank=True, sync_files=True)
    writer.fs = file_system = _RecordingFileSystem()
    local_failure, records = False, {}
    try:
        dcp.save(
            job.state,
            storage_writer=writer,
            process_group=comm.group,
            no_dist=comm.group is None,
        )
        known.update(file_system.records)
        records = _own_records(tmp, rank, list(job.files), known)
    except (Exception, CheckpointException) as exc:
        local_failure = bool(file_system.errors) or not isinstance(exc, CheckpointException)
        error = describe(file_system.errors[0] if file_system.errors else exc)
        if not error.startswith("rank "):
            error = f"rank {rank}: {error}"
    gathered = comm.all_gather((records, error, local_failure))
    # The failing rank's own account first: the others only know DCP's summary of it.
    errors = [e for _, e, local in gathered if e and local] + [e for _, e, _ in gathered if e]
    if errors:
        return failed(errors[0], tmp)

    # [4] rank 0 checksums what nobody claimed, writes the commit record and renames
    path = None
    if rank == 0:
        try:
            merged: dict[str, FileRecord] = {}
            for rank_records, _, _ in gathered:
                merged.update(rank_records)
            for extra in sorted(p.name for p in tmp.iterdir() if p.name not in merged):
                merged[extra] = known.get(extra) or checksum_file(tmp / extra)
            path = commit(tmp, root, job.step, comm.world_size, merged)
        except OSError as exc:
            error = f"rank 0: {describe(exc)}"
        if path is not None:
            try:
                retain(root, keep)
            except OSError as exc:  # the new commit stands; old ones linger until next time
                logger.warning("checkpoint: could not delete old checkpoints: %s", describe(exc))
    path, error = comm.broadcast((path, error))
    if error is not None:
        return failed(error, tmp)
    return PersistOutcome(job.step, path, None, time.perf_counter() - start)


class BackgroundPersister:
    """One daemon thread that persists jobs in order (at most one in flight).

    A daemon, so a persist blocked on a dead peer never keeps a failing process alive.
    """

    def __init__(
        self,
        run: Callable[[PersistJob], PersistOutcome],
        on_done: Callable[[PersistOutcome], None],
    ) -> None:
        self._run, self._on_done = run, on_done
        self._jobs: queue.Queue[PersistJob | None] = queue.Queue()
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._loop, name="memplan-ckpt-persist", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        """A job is queued or being written."""
        return not self._idle.is_set()

    def submit(self, job: PersistJob) -> None:
        """Queue a job (callers wait_idle() first: the host buffers are reused)."""
        self._idle.clear()
        self._jobs.put(job)

    def wait_idle(self) -> None:
        """Block until every submitted job has finished."""
        self._idle.wait()

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                outcome = self._run(job)
            except BaseException as exc:  # a bug: report it as a failed attempt, keep going
                logger.exception("checkpoint step %d: persisting crashed", job.step)
                outcome = PersistOutcome(job.step, None, describe(exc), 0.0)
            try:
                self._on_done(outcome)
            finally:
                if self._jobs.empty():
                    self._idle.set()

    def close(self) -> None:
        """Finish queued jobs and stop the thread."""
        self._jobs.put(None)
        self._thread.join()
