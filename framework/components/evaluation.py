"""Validation loss: the whole data.val_path file, cut into consecutive windows, every layout.

    tokens [t0 t1 ... ]  ->  window i = tokens[i*(L+1) : (i+1)*(L+1)]  (a partial last one
    dropped), inputs its first L tokens, targets its last L; the loss is the mean
    cross-entropy over every predicted token of every window.

The windows are spread over data-parallel ranks in contiguous blocks of ceil(W / dp). Every
rank runs the same number of micro-batches (FSDP's all-gathers, Ulysses' all-to-alls and
the pipeline's sends are collectives): a rank's share is padded with rows whose targets are
PAD_TARGET, which run through the forward and count nothing. Each rank sums its real
tokens' cross-entropy and counts them; the runtime all-reduces both (EvalSums).

Nothing here changes training state: no gradients, no optimizer or schedule step, no RNG
draw (windows are fixed, not sampled), and the training loader is not touched.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from configs.errors import ConfigError
from configs.schema import DataConfig
from framework.components.data import open_tokens

PAD_TARGET = -1
"""Targets of a padding row (whole rows only, after a micro-batch's real rows)."""


@dataclass(frozen=True)
class EvalSums:
    """Summed cross-entropy and predicted tokens over every rank's real windows."""

    loss_sum: float
    tokens: int

    @property
    def loss(self) -> float:
        """The mean cross-entropy per predicted token."""
        return self.loss_sum / self.tokens


def open_validation_tokens(data: DataConfig) -> np.ndarray:
    """data.val_path memory-mapped as data.dtype (read like data.path); ConfigError naming
    data.val_path when it cannot be (train.eval_every when there is none)."""
    if data.val_path is None:
        raise ConfigError("train.eval_every", "> 0 needs data.val_path=TOKENS.bin")
    try:
        return open_tokens(dataclasses.replace(data, path=data.val_path))
    except ConfigError as exc:
        raise ConfigError("data.val_path", str(exc).removeprefix(f"{exc.key}: ")) from exc


class ValidationSet:
    """The windows of a validation token array and one rank's padded share of them."""

    def __init__(self, tokens: np.ndarray, seq_len: int, vocab_size: int) -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.num_windows = len(tokens) // (seq_len + 1)
        if self.num_windows == 0:
            raise ConfigError(
                "data.val_path",
                f"holds {len(tokens)} tokens, shorter than one window of train.seq_len + 1 = "
                f"{seq_len + 1}",
            )

    @property
    def num_tokens(self) -> int:
        """Predicted tokens over all windows (what EvalSums.tokens must come to)."""
        return self.num_windows * self.seq_len

    def rank_windows(self, dp_rank: int, dp_size: int) -> range:
        """This data-parallel rank's windows: a contiguous block of ceil(W / dp)."""
        per_rank = math.ceil(self.num_windows / dp_size)
        start = min(dp_rank * per_rank, self.num_windows)
        return range(start, min(start + per_rank, self.num_windows))

    def rows_per_rank(self, dp_size: int, rows_per_call: int) -> int:
        """Rows every rank runs: its largest share, rounded up to whole calls."""
        per_rank = math.ceil(self.num_windows / dp_size)
        return math.ceil(per_rank / rows_per_call) * rows_per_call

    def batches(
        self, dp_rank: int, dp_size: int, rows_per_call: int
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """(inputs, targets) [rows_per_call, seq_len] int64 on the CPU: this rank's windows in
        order, then padding rows (inputs 0, targets PAD_TARGET); the same number of batches
        on every rank. rows_per_call: micro_batch_size, times the micro-batches of one
        pipeline schedule call under pp."""
        windows = self.rank_windows(dp_rank, dp_size)
        width = self.seq_len + 1
        total = self.rows_per_rank(dp_size, rows_per_call)
        for first in range(0, total, rows_per_call):
            inputs = torch.zeros((rows_per_call, self.seq_len), dtype=torch.int64)
            targets = torch.full((rows_per_call, self.seq_len), PAD_TARGET, dtype=torch.int64)
            real = windows[first : first + rows_per_call]
            if len(real):
                start, stop = real.start * width, real.stop * width
                block = self.tokens[start:stop].astype(np.int64).reshape(len(real), width)
                largest = int(block.max())
                if largest >= self.vocab_size:
                    raise ConfigError(
                        "data.val_path", f"token id {largest} >= model.vocab_size={self.vocab_size}"
                    )
                block = torch.from_numpy(block)
                inputs[: len(real)] = block[:, :-1]
                targets[: len(real)] = block[:, 1:]
            yield inputs, targets


def real_rows(targets: Tensor) -> int:
    """How many leading rows of a micro-batch's CPU targets are real (not padding); read on
    the host, so it costs no device sync."""
    real = targets[:, 0] != PAD_TARGET
    count = int(real.sum())
    if not bool(real[:count].all()):
        raise ValueError("padding rows must follow a micro-batch's real rows")
    return count


def summed_loss(
    loss: Callable[[Tensor, Tensor], Tensor], hidden: Tensor, targets: Tensor
) -> Tensor:
    """[summed cross-entropy, predicted tokens] (float64, on hidden's device) of one
    micro-batch's real rows.

    `loss(hidden, targets)` is the model's token-mean chunked cross-entropy; targets are the
    CPU targets of this rank's tokens (its sequence chunk under Ulysses). A padding-only
    micro-batch still calls `loss` on one row and weighs it 0: under FSDP or ZeRO-3 the loss
    gathers the output weight, a collective every rank must join.
    """
    rows = real_rows(targets)
    tokens = rows * targets.shape[1]
    keep = max(rows, 1)
    labels = targets[:keep].clamp(min=0).to(hidden.device, non_blocking=True)
    mean = loss(hidden[:keep], labels)
    count = torch.tensor(float(tokens), dtype=torch.float64, device=hidden.device)
    return torch.stack([mean.detach().double() * tokens, count])
