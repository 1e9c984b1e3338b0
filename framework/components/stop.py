"""Stopping a run early, with a checkpoint, on a signal: SIGUSR1 from SLURM's
`--signal=USR1@<seconds>` before the job's time limit (launch/templates/slurm_job.sh), or from
a user (`kill -USR1 <worker pid>`).

The handler only sets a flag. After every step the train loop asks whether any rank got it:
one all-reduce of a CPU int on a gloo group of its own (host-to-host; it does not wait for the
device), so every rank stops after the same step and saves the same checkpoint.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import torch
import torch.distributed as dist


class StopRequest:
    """SIGUSR1 (or `signum`) asks the run to stop after the current step."""

    def __init__(self, signum: int = signal.SIGUSR1) -> None:
        self.signum = signum
        self.received = False
        distributed = dist.is_initialized() and dist.get_world_size() > 1
        # its own group: the checkpointer's group is busy in a background thread
        self.group = dist.new_group(backend="gloo") if distributed else None
        # only the main thread may set handlers: train() run from another thread (a test,
        # a notebook's worker) simply cannot be stopped this way
        self.installed = threading.current_thread() is threading.main_thread()
        self.previous = signal.signal(signum, self._handle) if self.installed else None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = True

    def agreed(self) -> bool:
        """Whether any rank has received the signal (a collective: every rank calls it after
        the same steps)."""
        if self.group is None:
            return self.received
        flag = torch.tensor([int(self.received)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    def close(self) -> None:
        """Restore the previous handler and release the group."""
        if self.installed:  # None: a handler set outside Python, restored as the default
            signal.signal(self.signum, self.previous or signal.SIG_DFL)
            self.installed = False
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None
