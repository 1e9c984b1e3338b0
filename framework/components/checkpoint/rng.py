"""Random-number-generator streams of one rank (torch CPU and CUDA, Python, NumPy)."""

from __future__ import annotations

import io
import random
from typing import Any

import numpy as np
import torch


def capture_rng_state(device: torch.device) -> dict[str, Any]:
    """Every RNG stream this rank draws from, as it is now."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Continue every RNG stream from a captured state."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def rng_state_bytes(state: dict[str, Any]) -> bytes:
    """The state serialised for a per-rank checkpoint file."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def rng_state_from_bytes(data: bytes) -> dict[str, Any]:
    """Inverse of rng_state_bytes. Not weights_only: NumPy's state is a pickled tuple; the
    file is our own and its CRC32 was verified before loading."""
    return torch.load(io.BytesIO(data), weights_only=False)
