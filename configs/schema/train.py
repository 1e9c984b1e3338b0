"""Schemas of the `train` group (optimisation) and the `data` node (token source)."""

from dataclasses import dataclass
from typing import Literal

from configs.checks import check_bounds


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
    eval_every: int = 0
    """Validation loss over data.val_path before the first step and every this many steps;
    0 turns it off."""

    def __post_init__(self) -> None:
        counts = ("seq_len", "global_batch_size", "micro_batch_size", "steps", "loss_chunk_tokens")
        check_bounds(self, "train", counts, at_least=1)  # micro_batch_size may be null
        check_bounds(self, "train", ("seed", "warmup_steps", "grad_clip", "eval_every"), at_least=0)
        check_bounds(self, "train", ("weight_decay",), at_least=0)
        check_bounds(self, "train", ("lr", "adam_eps"), above=0)
        check_bounds(self, "train", ("min_lr_ratio",), at_least=0, at_most=1)
        check_bounds(self, "train", ("beta1", "beta2"), at_least=0, below=1)  # Adam diverges at 1


@dataclass(frozen=True)
class DataConfig:
    """Where training tokens come from."""

    path: str | None = None
    """A flat token file (nanoGPT .bin); None uses the embedded corpus (no download)."""
    val_path: str | None = None
    """A validation token file (same format and data.dtype as path); train.eval_every > 0
    reports the mean loss over all of it, cut into consecutive windows of seq_len + 1."""
    dtype: Literal["auto", "uint16", "uint32"] = "auto"
    """Element type of the token file; auto: the one its metadata (PATH.meta.json, written by
    `memplan data`) records, uint16 for a file without metadata."""
    embedded_max_bytes: int = 8 * 2**20
    """Size cap of the embedded corpus: byte tokens from Python's standard library sources."""

    def __post_init__(self) -> None:
        check_bounds(self, "data", ("embedded_max_bytes",), at_least=4096)
