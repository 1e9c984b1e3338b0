"""Checkpointable state of every torch runtime (one process or a parallel layout), keyed by
fully qualified parameter name.

torch.distributed.checkpoint saves each key once and loads any key into any layout, so:
- model: get_model_state_dict of every local stage (FSDP/TP shards are DTensors; DCP
  reassembles them for any other sharding);
- optimizer: the *flattened* optimizer state dict (`state.<fqn>.exp_avg`,
  `param_groups.<fqn>.lr`, ...), so pipeline stages and ZeRO-1 owners, which hold
  different parameter sets, never write different values under one key;
- the last stage's tied-embedding copy is saved and loaded as tok_embeddings.weight (it is
  equal to the embedding by construction).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from parallel.stage_model import EMBEDDING_FQN, TIED_COPY_FQN

_PREFIXES = ("state.", "param_groups.")


def _options() -> StateDictOptions:
    # strict=False: a stage holds only some keys of the full state dict
    return StateDictOptions(strict=False, flatten_optimizer_state_dict=True)


def _holds_tied_copy(module: nn.Module) -> bool:
    """A last pipeline stage's copy of the tied embedding (parallel.stage_model.StageModel)."""
    return bool(getattr(module, "holds_tied_copy", False))


def _rename(state: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    """Keys `old`, `state.old.*`, `param_groups.old.*` renamed to `new` (others kept)."""
    renamed = {}
    for key, value in state.items():
        if key == old:
            key = new
        for prefix in _PREFIXES:
            if key.startswith(prefix + old + "."):
                key = prefix + new + key[len(prefix + old) :]
        renamed[key] = value
    return renamed


class ModelState(Stateful):
    """Parameters of this rank's models (the whole Transformer, or its pipeline stages) by FQN."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules

    def state_dict(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for module in self.modules:
            state = get_model_state_dict(module, options=_options())
            if _holds_tied_copy(module):
                state = _rename(state, TIED_COPY_FQN, EMBEDDING_FQN)
            merged.update(state)
        return merged

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for module in self.modules:
            state = state_dict
            if _holds_tied_copy(module):
                state = {**state_dict, TIED_COPY_FQN: state_dict[EMBEDDING_FQN]}
            set_model_state_dict(module, state, options=_options())


class OptimizerState(Stateful):
    """Optimizer state of this rank's models (one optimizer each) by FQN."""

    def __init__(self, modules: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> None:
        self.modules, self.optimizers = modules, optimizers

    def state_dict(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for module, optimizer in zip(self.modules, self.optimizers, strict=True):
            state = get_optimizer_state_dict(module, optimizer, options=_options())
            if _holds_tied_copy(module):
                state = _rename(state, TIED_COPY_FQN, EMBEDDING_FQN)
            merged.update(state)
        return merged

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for module, optimizer in zip(self.modules, self.optimizers, strict=True):
            state = state_dict
            if _holds_tied_copy(module):
                copy = _rename(state_dict, EMBEDDING_FQN, TIED_COPY_FQN)
                state = {k: v for k, v in copy.items() if TIED_COPY_FQN in k} | state_dict
            set_optimizer_state_dict(module, optimizer, state, options=_options())


class SchedulerState(Stateful):
    """The LR schedule position, the same for every local optimizer."""

    def __init__(self, schedulers: list[torch.optim.lr_scheduler.LRScheduler]) -> None:
        self.schedulers = schedulers

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self.schedulers[0].last_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for scheduler in self.schedulers:
            scheduler.last_epoch = int(state_dict["last_epoch"])
            scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
