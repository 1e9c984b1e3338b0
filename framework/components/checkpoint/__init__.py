"""Asynchronous, atomic, resharding checkpoints of a training run.

- staging: lazy host snapshots that overlap the next forward/backward (DataStates-LLM)
- persist: DCP writes on the checkpoint's own gloo group, in a background thread
- storage: on-disk layout, the atomic commit protocol, checksums, retention
- checkpointer: what the trainer calls (save, before_update, resume, finish, close)
"""

from framework.components.checkpoint.checkpointer import Checkpointer, CheckpointStats, Resumed

__all__ = ["CheckpointStats", "Checkpointer", "Resumed"]
