"""On-disk layout of checkpoints and the atomic commit protocol (no torch, no collectives).

    <dir>/step_000000120/              committed: the name exists only once it is complete
        .metadata  __0_0.distcp ...    torch.distributed.checkpoint (sharded, any layout loads it)
        rank_00000.pt ...              per-rank state (RNG streams)
        train_state.json               step and data-loader position
        plan.json  config.json         the plan and the resolved config that produced it
        commit.json                    written last: step, world size, size + CRC32 of every file
    <dir>/.tmp-step_000000120-<id>/    being written, or left by a crash: never read
    <dir>/corrupt-step_000000120-<id>/ failed verification at resume: kept for inspection
                                       (the newest checkpoint.keep of them)

Commit: every rank writes and fsyncs its files into the temporary directory; rank 0 writes
commit.json, fsyncs it and the directory, renames it to step_N and fsyncs <dir>. A crash at
any moment leaves either the complete step_N or none, and the previous commits untouched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

COMMIT_FILE = "commit.json"
FORMAT_VERSION = 1
_COMMITTED = re.compile(r"^step_(\d{9})$")
_CORRUPT = re.compile(r"^corrupt-step_(\d{9})-")
_TMP_PREFIX = ".tmp-"
_READ_CHUNK_BYTES = 16 * 2**20


class CorruptCheckpoint(Exception):
    """A committed checkpoint whose commit record or files do not match (truncated, damaged)."""


@dataclass(frozen=True)
class FileRecord:
    """Size and CRC32 of one checkpoint file."""

    bytes: int
    crc32: str

    def to_json(self) -> dict[str, int | str]:
        return {"bytes": self.bytes, "crc32": self.crc32}


def step_dir_name(step: int) -> str:
    """step_000000120: fixed width, so names sort by step."""
    return f"step_{step:09d}"


def list_committed(root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every committed checkpoint under root, newest first."""
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _COMMITTED.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found, reverse=True)


def checksum_file(path: Path) -> FileRecord:
    """Size and CRC32 of a file, read in chunks (zlib releases the GIL while it hashes)."""
    crc, size = 0, 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_READ_CHUNK_BYTES):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return FileRecord(size, f"{crc:08x}")


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (created, renamed, removed files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """Write a whole file and fsync it (its directory entry is fsynced at commit)."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def make_tmp_dir(root: Path, step: int) -> Path:
    """A fresh, uniquely named temporary directory for the checkpoint of `step`."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{_TMP_PREFIX}{step_dir_name(step)}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def remove_stale_tmp_dirs(root: Path) -> list[Path]:
    """Delete temporary directories left by crashed or failed attempts; returns them."""
    if not root.is_dir():
        return []
    stale = [entry for entry in root.iterdir() if entry.name.startswith(_TMP_PREFIX)]
    for entry in stale:
        shutil.rmtree(entry, ignore_errors=True)
    return stale


def commit(tmp: Path, root: Path, step: int, world_size: int, files: dict[str, FileRecord]) -> Path:
    """Write commit.json into tmp, make everything durable, rename tmp to step_N.

    An existing step_N (one that failed verification and was retrained) is moved aside
    first and deleted after the rename, so a crash in between still leaves a valid state.
    """
    record = {
        "format": FORMAT_VERSION,
        "step": step,
        "world_size": world_size,
        "files": {name: files[name].to_json() for name in sorted(files)},
    }
    write_durably(tmp / COMMIT_FILE, json.dumps(record, indent=1).encode())
    fsync_dir(tmp)
    final = root / step_dir_name(step)
    replaced = None
    if final.exists():
        replaced = root / f"{_TMP_PREFIX}replaced-{final.name}-{uuid.uuid4().hex[:8]}"
        os.rename(final, replaced)
    os.rename(tmp, final)
    fsync_dir(root)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    return final


def read_commit(directory: Path) -> dict:
    """The commit record of a committed checkpoint; CorruptCheckpoint if unreadable."""
    try:
        record = json.loads((directory / COMMIT_FILE).read_text())
        files = record["files"]
        int(record["step"]), int(record["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptCheckpoint(f"{directory.name}/{COMMIT_FILE}: {exc}") from exc
    if not isinstance(files, dict) or not files:
        raise CorruptCheckpoint(f"{directory.name}/{COMMIT_FILE}: no file records")
    return record


def verify_files(directory: Path, record: dict, names: Iterable[str]) -> list[str]:
    """Problems found checking `names` (a subset of the record's files) against the record."""
    problems = []
    for name in names:
        expected = record["files"][name]
        path = directory / name
        try:
            actual = checksum_file(path)
        except OSError as exc:
            problems.append(f"{directory.name}/{name}: {exc.strerror or exc}")
            continue
        if actual.bytes != expected["bytes"]:
            problems.append(
                f"{directory.name}/{name}: {actual.bytes} bytes, committed {expected['bytes']}"
            )
        elif actual.crc32 != expected["crc32"]:
            problems.append(
                f"{directory.name}/{name}: CRC32 {actual.crc32}, committed {expected['crc32']}"
            )
    return problems


def quarantine(directory: Path) -> Path:
    """Move a checkpoint that failed verification out of the committed namespace."""
    target = directory.with_name(f"corrupt-{directory.name}-{uuid.uuid4().hex[:8]}")
    os.rename(directory, target)
    fsync_dir(directory.parent)
    return target


def retain(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` committed checkpoints; returns the deleted ones."""
    doomed = [path for _, path in list_committed(root)[keep:]]
    for path in doomed:
        # Out of the committed namespace first, so a crash mid-delete leaves no partial step_N.
        trash = root / f"{_TMP_PREFIX}deleted-{path.name}-{uuid.uuid4().hex[:8]}"
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    if doomed:
        fsync_dir(root)
    return doomed


def prune_corrupt(root: Path, keep: int) -> list[Path]:
    """Delete all but the `keep` most recently quarantined corrupt-* directories (a rename
    sets the inode's ctime; ties by step); returns the deleted ones."""
    found = []
    for entry in root.iterdir() if root.is_dir() else []:
        match = _CORRUPT.match(entry.name)
        if match and entry.is_dir():
            found.append((entry.stat().st_ctime, int(match.group(1)), entry))
    doomed = [entry for _, _, entry in sorted(found, reverse=True)[keep:]]
    for entry in doomed:
        shutil.rmtree(entry)
    return doomed
