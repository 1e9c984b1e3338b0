"""Training tokens: memory-mapped token files and an embedded corpus that needs no download.

- Token files are flat arrays of uint16/uint32 token ids (nanoGPT's .bin format), memory-mapped
  so a file larger than RAM costs nothing until read.
- The embedded corpus is byte-level (token = byte, vocabulary 256) text every machine has:
  the .py sources of Python's own standard library, in sorted path order.

Batches are random windows chosen by a generator seeded from (seed, batch index) only, so
batch n is the same whatever the world size, and a loader's whole state is one counter.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from configs.errors import ConfigError
from configs.schema import DataConfig
from configs.tokens import token_file


def stdlib_corpus(max_bytes: int) -> np.ndarray:
    """Bytes of the standard library's .py files (sorted by path), at most max_bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).parts
        if "site-packages" in relative or "dist-packages" in relative:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data[: max_bytes - size])
        size += len(chunks[-1])
        if size >= max_bytes:
            break
    return np.frombuffer(b"".join(chunks), dtype=np.uint8)


def open_tokens(cfg: DataConfig) -> np.ndarray:
    """The token array: a read-only memmap of cfg.path (as data.dtype, or for auto the dtype
    its metadata records), or the embedded corpus."""
    found = token_file(cfg)
    if found is None:
        return stdlib_corpus(cfg.embedded_max_bytes)
    try:
        return np.memmap(found.path, dtype=found.dtype, mode="r")
    except (OSError, ValueError) as exc:
        raise ConfigError("data.path", f"cannot map {cfg.path}: {exc}") from exc


def _batch_seed(seed: int, index: int) -> int:
    digest = hashlib.sha256(f"memplan-data:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class TokenLoader:
    """Global batch n -> (inputs, targets) [rows, seq_len] int64 for one data-parallel rank.

    Each global batch holds `global_batch_size` windows of seq_len + 1 tokens; rank r of dp
    takes rows r*G/dp .. (r+1)*G/dp. State: the index of the next batch.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        global_batch_size: int,
        seed: int,
        vocab_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
    ) -> None:
        if len(tokens) < seq_len + 2:
            raise ConfigError(
                "train.seq_len", f"{seq_len} needs more than the corpus' {len(tokens)} tokens"
            )
        if global_batch_size % dp_size:
            raise ConfigError(
                "train.global_batch_size",
                f"{global_batch_size} is not divisible by dp={dp_size}",
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.vocab_size = vocab_size
        self.rows = slice(
            dp_rank * global_batch_size // dp_size, (dp_rank + 1) * global_batch_size // dp_size
        )
        self.next_index = 0

    def batch(self, index: int) -> tuple[Tensor, Tensor]:
        """This rank's rows of global batch `index` (a pure function of seed and index)."""
        generator = torch.Generator().manual_seed(_batch_seed(self.seed, index))
        starts = torch.randint(
            0, len(self.tokens) - self.seq_len - 1, (self.global_batch_size,), generator=generator
        )[self.rows]
        windows = np.stack([self.tokens[s : s + self.seq_len + 1] for s in starts.tolist()])
        windows = torch.from_numpy(windows.astype(np.int64))
        if int(windows.max()) >= self.vocab_size:
            raise ConfigError(
                "data.path",
                f"token id {int(windows.max())} >= model.vocab_size={self.vocab_size}",
            )
        return windows[:, :-1], windows[:, 1:]

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """The next batch; advances the state."""
        inputs, targets = self.batch(self.next_index)
        self.next_index += 1
        return inputs, targets

    def state_dict(self) -> dict[str, int]:
        """Everything needed to continue exactly where this loader is."""
        return {"next_index": self.next_index, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved state (the seed must match the configured one)."""
        if int(state["seed"]) != self.seed:
            raise ConfigError(
                "train.seed", f"checkpoint was written with seed {state['seed']}, not {self.seed}"
            )
        self.next_index = int(state["next_index"])
