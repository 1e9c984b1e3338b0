"""The trainer's checkpointing object: save on a cadence, resume the newest valid commit.

What blocks the training thread, per checkpoint (async modes):
- save(): collecting the state dicts (views, no copies) and starting the host copy; waiting
  first for the previous checkpoint to finish persisting, if it is still running;
- before_update() (the runtime calls it right before the optimizer step): only if the host
  copy has not finished by then.
Writing, checksumming and committing happen in a background thread on the checkpoint's own
gloo group; the default group is never used from there (DCP on it hangs while training runs).
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.stateful import Stateful

from configs.schema import CheckpointConfig
from framework.components.checkpoint.persist import (
    BackgroundPersister,
    Collectives,
    PersistJob,
    PersistOutcome,
    describe,
    persist,
)
from framework.components.checkpoint.rng import (
    capture_rng_state,
    restore_rng_state,
    rng_state_bytes,
    rng_state_from_bytes,
)
from framework.components.checkpoint.staging import HostSnapshot, state_bytes
from framework.components.checkpoint.storage import (
    CorruptCheckpoint,
    list_committed,
    prune_corrupt,
    quarantine,
    read_commit,
    remove_stale_tmp_dirs,
    verify_files,
)
from planner.units import format_bytes

logger = logging.getLogger(__name__)

TRAIN_STATE_FILE = "train_state.json"
_ATTEMPT_DIR = re.compile(r"\.tmp-step_\d+-[0-9a-f]+")


def failure_cause(error: str) -> str:
    """A failed attempt's error without what differs between attempts (the temporary
    directory's name), so the same cause is reported once."""
    return _ATTEMPT_DIR.sub(".tmp-step_*", error)


def rank_file_name(rank: int) -> str:
    """Per-rank state (RNG streams) of `rank`."""
    return f"rank_{rank:05d}.pt"


@dataclass(frozen=True)
class Resumed:
    """Where a resumed run continues."""

    step: int
    """Optimizer steps already done."""
    train_state: dict[str, Any]
    """What the trainer passed to save() (e.g. the data loader's position)."""
    path: Path
    world_size: int
    """World size of the run that wrote the checkpoint."""


@dataclass
class CheckpointStats:
    """One save attempt, as the training thread saw it."""

    step: int
    blocked_seconds: float = 0.0
    """Training thread blocked in save() and in the pre-update wait."""
    persist_seconds: float | None = None
    """Background write + commit (None until it ends)."""
    committed: bool | None = None


class Checkpointer:
    """Saves model, optimizer and LR-schedule state (DCP, sharded), per-rank RNG streams and
    the trainer's state; resumes from the newest commit whose checksums match."""

    def __init__(
        self,
        cfg: CheckpointConfig,
        root: Path,
        parts: dict[str, Stateful],
        device: torch.device,
        run_files: dict[str, bytes],
    ) -> None:
        self.cfg, self.root, self.parts, self.device = cfg, root, parts, device
        self.run_files = run_files
        # Its own group (collective calls in the same order on every rank).
        group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self.comm = Collectives(group)
        self.rank = self.comm.rank
        self.stats: list[CheckpointStats] = []
        self.last_committed: int | None = None
        self.snapshot = HostSnapshot(pin_memory=device.type == "cuda")
        self.persister = (
            BackgroundPersister(self._persist, self._report) if cfg.async_mode == "thread" else None
        )
        self._warned_slow_persist = False
        self.failures: dict[str, int] = {}
        """Failed attempts by cause (the error without its attempt's temporary path)."""
        if self.rank == 0 and cfg.every > 0:
            try:
                for stale in remove_stale_tmp_dirs(root):
                    logger.info("checkpoint: removed %s (left by an interrupted save)", stale.name)
            except OSError as exc:
                logger.warning("checkpoint: cannot clean %s: %s", root, describe(exc))

    # ----------------------------------------------------------------------------- saving

    def due(self, step: int, last_step: int) -> bool:
        """Save after this step: every `checkpoint.every` steps, and after the job's last."""
        every = self.cfg.every
        return every > 0 and (step % every == 0 or step == last_step)

    def save(self, step: int, train_state: dict[str, Any]) -> None:
        """Checkpoint the state after optimizer step `step`. Async modes return once the host
        copy has started; sync mode returns after the commit."""
        start = time.perf_counter()
        if self.persister is not None and self.persister.busy:
            self.persister.wait_idle()  # its host buffers are about to be refilled
            if not self._warned_slow_persist and self.rank == 0:
                logger.warning(
                    "checkpoint step %d: waited %.2f s for the previous checkpoint to persist;"
                    " checkpoint.every=%d steps is shorter than a persist",
                    step,
                    time.perf_counter() - start,
                    self.cfg.every,
                )
            self._warned_slow_persist = True
        state = {name: part.state_dict() for name, part in self.parts.items()}
        files = {rank_file_name(self.rank): rng_state_bytes(capture_rng_state(self.device))}
        if self.rank == 0:
            files[TRAIN_STATE_FILE] = json.dumps({"step": step, **train_state}).encode()
            files.update(self.run_files)
        stats = CheckpointStats(step)
        self.stats.append(stats)
        if self.persister is None:
            job = PersistJob(step, state, lambda: None, files, state_bytes(state))
            self._report(self._persist(job))
        else:
            host_state = self.snapshot.stage(state)
            job = PersistJob(step, host_state, self.snapshot.wait_ready, files, state_bytes(state))
            self.persister.submit(job)
        stats.blocked_seconds += time.perf_counter() - start

    def before_update(self) -> None:
        """Call right before parameters or optimizer state are written (the optimizer step):
        waits for a snapshot copy that is still reading them. Cheap when none is."""
        start = time.perf_counter()
        self.snapshot.wait_for_source_writes()
        if self.stats:
            self.stats[-1].blocked_seconds += time.perf_counter() - start

    def finish(self) -> None:
        """Wait until the last checkpoint is committed (or has failed); if any failed, say
        once how many, why, and which checkpoint a rerun would resume from."""
        if self.persister is not None:
            self.persister.wait_idle()
        if self.rank == 0:
            for line in self.failure_summary():
                logger.warning(line)

    def failure_summary(self) -> list[str]:
        """The end-of-run lines about failed saves (none when every save committed)."""
        failed = [stats.step for stats in self.stats if stats.committed is False]
        if not failed:
            return []
        causes = "; ".join(
            cause if count == 1 else f"{count}x {cause}" for cause, count in self.failures.items()
        )
        newest = self._newest_commit()
        newest_text = f"step {newest[0]} ({newest[1]})" if newest else "none"
        lines = [
            f"checkpoint: {len(failed)} of {len(self.stats)} saves failed ({causes}); newest "
            f"committed checkpoint: {newest_text}"
        ]
        if self.stats[-1].committed is False:
            rerun = f"resumes from step {newest[0]}" if newest else "starts at step 1 (none"
            lines.append(
                f"warning: the final checkpoint (step {self.stats[-1].step}) failed: a rerun "
                + (rerun if newest else f"{rerun} is committed)")
            )
        return lines

    def _newest_commit(self) -> tuple[int, Path] | None:
        try:
            committed = list_committed(self.root)
        except OSError:
            committed = []
        return committed[0] if committed else None

    def close(self) -> None:
        """Stop the background thread and release the group (after finish(); if a save is
        still pending, training failed: it is abandoned, as it may wait on a dead peer)."""
        if self.persister is not None and self.persister.busy:
            logger.warning("checkpoint: abandoning an unfinished save")
            self.persister = None
            return
        if self.persister is not None:
            self.persister.close()
            self.persister = None
        if self.comm.group is not None:
            dist.destroy_process_group(self.comm.group)
            self.comm.group = None

    def _persist(self, job: PersistJob) -> PersistOutcome:
        outcome = persist(job, self.root, self.cfg.keep, self.comm)
        outcome.details["num_bytes"] = job.num_bytes
        return outcome

    def _report(self, outcome: PersistOutcome) -> None:
        """Log the outcome once (rank 0) and record it."""
        for stats in self.stats:
            if stats.step == outcome.step and stats.committed is None:
                stats.persist_seconds, stats.committed = outcome.seconds, outcome.path is not None
        if outcome.path is not None:
            self.last_committed = outcome.step
            if self.rank == 0:
                logger.info(
                    "checkpoint step %d committed in %.2f s (%s on rank 0): %s",
                    outcome.step,
                    outcome.seconds,
                    format_bytes(outcome.details.get("num_bytes", 0)),
                    outcome.path,
                )
        else:
            cause = failure_cause(outcome.error or "unknown error")
            first = cause not in self.failures
            self.failures[cause] = self.failures.get(cause, 0) + 1
            if first and self.rank == 0:  # the same cause again is counted for the summary
                newest = f"step {self.last_committed}" if self.last_committed else "none this run"
                logger.error(
                    "checkpoint step %d failed, training continues (newest commit: %s): %s",
                    outcome.step,
                    newest,
                    outcome.error,
                )

    # ---------------------------------------------------------------------------- resuming

    def resume(self) -> Resumed | None:
        """Load the newest committed checkpoint whose files match their checksums.

        A damaged one is reported once, moved aside (corrupt-step_N) and the previous one is
        tried. Returns None when there is none. Collective over the checkpoint group.
        """
        names = self.comm.broadcast(
            [path.name for _, path in list_committed(self.root)] if self.rank == 0 else None
        )
        damaged = 0
        for name in names:
            directory = self.root / name
            problems = self._verify(directory)
            if problems:
                damaged += 1
                if self.rank == 0:
                    moved = self._quarantine(directory)
                    logger.error(
                        "checkpoint %s is damaged (%s%s); %s; trying the previous one",
                        name,
                        problems[0],
                        f" and {len(problems) - 1} more" if len(problems) > 1 else "",
                        f"moved to {moved.name}" if moved else "left in place",
                    )
                continue
            self._prune_corrupt(damaged)
            return self._load(directory)
        self._prune_corrupt(damaged)
        if damaged and self.rank == 0:
            logger.warning(
                "no intact checkpoint in %s (%d damaged, kept as corrupt-*); starting at step 1",
                self.root,
                damaged,
            )
        return None

    def _prune_corrupt(self, damaged: int) -> None:
        """Keep at most checkpoint.keep corrupt-* directories (the newest)."""
        if not damaged or self.rank != 0:
            return
        try:
            removed = prune_corrupt(self.root, self.cfg.keep)
        except OSError as exc:
            logger.warning("checkpoint: cannot delete old corrupt-* directories: %s", describe(exc))
            return
        if removed:
            logger.info(
                "checkpoint: deleted %s (checkpoint.keep=%d damaged ones are kept)",
                ", ".join(path.name for path in removed),
                self.cfg.keep,
            )

    def _verify(self, directory: Path) -> list[str]:
        """Every rank checks its share of the files; the problems of all ranks."""
        try:
            record = read_commit(directory)
            names = sorted(record["files"])[self.rank :: self.comm.world_size]
            problems = verify_files(directory, record, names)
        except CorruptCheckpoint as exc:
            problems = [str(exc)]
        return [p for rank_problems in self.comm.all_gather(problems) for p in rank_problems]

    @staticmethod
    def _quarantine(directory: Path) -> Path | None:
        try:
            return quarantine(directory)
        except OSError as exc:
            logger.warning("checkpoint: cannot move %s aside: %s", directory, describe(exc))
            return None

    def _load(self, directory: Path) -> Resumed:
        record = read_commit(directory)
        start = time.perf_counter()
        dcp.load(
            dict(self.parts),
            checkpoint_id=directory,
            process_group=self.comm.group,
            no_dist=self.comm.group is None,
        )
        train_state = json.loads((directory / TRAIN_STATE_FILE).read_text())
        step = int(train_state.pop("step"))
        rank_file = directory / rank_file_name(self.rank)
        if rank_file.exists():
            restore_rng_state(rng_state_from_bytes(rank_file.read_bytes()), self.device)
        written_by = int(record["world_size"])
        if self.rank == 0:
            resharded = (
                f" (written by {written_by} ranks, resharded to {self.comm.world_size})"
                if written_by != self.comm.world_size
                else ""
            )
            logger.info(
                "resumed from %s at step %d in %.2f s%s",
                directory,
                step,
                time.perf_counter() - start,
                resharded,
            )
        self.last_committed = step
        return Resumed(step, train_state, directory, written_by)
