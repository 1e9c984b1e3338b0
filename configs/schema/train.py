"""Schemas of the `train` group (optimisation) and the `data` node (token source)."""

from dataclasses import dataclass
from typing import Literal

from configs.errors import ConfigError


@dataclass(frozen=True)
class TrainConfig:
    """What one optimizer step sees and how the optimizer behaves."""

    seq_len: int = 256
    """Tokens per sequence."""
    global_batch_size: int = 16
    """Sequences per optimizer step, summed over data-parallel ranks and micro-batches."""
    micro_batch_size: int | None = None
    """Sequences per forward/backward on one rank; None lets the planner choose."""
    steps: int = 300
    """Optimizer steps to run."""
    seed: int = 0
    """Seed for weights and data order."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = 20
    """Linear warm-up steps before the cosine decay."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (not applied to norms and biases)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """Compute dtype: auto = bf16 on GPU, fp32 on CPU."""
    loss_chunk_tokens: int = 4096
    """Tokens per chunk of the chunked cross-entropy (bounds the logits working set)."""

    def __post_init__(self) -> None:
        for key in ("seq_len", "global_batch_size", "steps", "loss_chunk_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}", f"must be >= 1, got {getattr(self, key)}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ConfigError(
                "train.micro_batch_size", f"must be >= 1 or null, got {self.micro_batch_size}"
            )
        if self.warmup_steps < 0:
            raise ConfigError("train.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError("train.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip < 0:
            raise ConfigError("train.grad_clip", f"must be >= 0, got {self.grad_clip}")


@dataclass(frozen=True)
class DataConfig:
    """Where training tokens come from."""

    path: str | None = None
    """A flat token file (nanoGPT .bin); None uses the embedded corpus (no download)."""
    dtype: Literal["uint16", "uint32"] = "uint16"
    """Element type of the token file."""
    embedded_max_bytes: int = 8 * 2**20
    """Size cap of the embedded corpus: byte tokens from Python's standard library sources."""

    def __post_init__(self) -> None:
        if self.embedded_max_bytes < 4096:
            raise ConfigError(
                "data.embedded_max_bytes", f"must be >= 4096, got {self.embedded_max_bytes}"
            )
