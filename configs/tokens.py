"""Checks of the training tokens (data.path, or the embedded corpus) that the launcher makes
before it writes a run directory or starts torchrun, so that what the workers would find
after start-up (a file shorter than one sequence, a token id the model has no embedding for)
is a one-line error naming the key instead. No torch; numpy only to scan a token file."""

from __future__ import annotations

from pathlib import Path

from configs.errors import ConfigError
from configs.schema import DataConfig

TOKEN_ITEMSIZE = {"uint16": 2, "uint32": 4}
EMBEDDED_VOCAB = 256
"""The embedded corpus is byte-level: token ids 0..255."""
_SCAN_ITEMS = 1 << 26  # 64 Mi tokens per chunk: the scan reads a mapped file, never all of it


def check_token_file(data: DataConfig) -> Path | None:
    """The token file's path, None for the embedded corpus; ConfigError (data.path) when the
    file is missing, unreadable, empty or not a whole number of data.dtype items."""
    if data.path is None:
        return None
    path = Path(data.path)
    if path.is_dir():
        raise ConfigError("data.path", f"{data.path} is a directory, not a token file")
    if not path.is_file():
        raise ConfigError("data.path", f"no such token file: {data.path}")
    itemsize = TOKEN_ITEMSIZE[data.dtype]
    try:
        size = path.stat().st_size
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ConfigError("data.path", f"cannot read {data.path}: {exc.strerror}") from exc
    if size == 0 or size % itemsize:
        raise ConfigError(
            "data.path",
            f"{data.path} is not a flat {data.dtype} array ({size} bytes, not a positive "
            f"multiple of {itemsize})",
        )
    return path


def max_token_id(path: Path, dtype: str) -> int:
    """The largest token id in a token file (a chunked scan of the memory-mapped file)."""
    import numpy as np

    tokens = np.memmap(path, dtype=dtype, mode="r")
    return max(int(tokens[i : i + _SCAN_ITEMS].max()) for i in range(0, len(tokens), _SCAN_ITEMS))


def check_training_tokens(data: DataConfig, seq_len: int, vocab_size: int) -> None:
    """ConfigError naming the key when the tokens cannot train this model at this length:
    fewer than seq_len + 2 tokens (a window of seq_len + 1 and a choice of start), or a token
    id >= model.vocab_size (the embedded corpus: bytes, so vocab_size >= 256)."""
    need = seq_len + 2
    path = check_token_file(data)
    if path is None:
        if data.embedded_max_bytes < need:
            raise ConfigError(
                "data.embedded_max_bytes",
                f"{data.embedded_max_bytes} bytes is shorter than one sequence: "
                f"train.seq_len={seq_len} needs >= {need}",
            )
        if vocab_size < EMBEDDED_VOCAB:
            raise ConfigError(
                "model.vocab_size",
                f"{vocab_size}, but the embedded corpus is bytes (token ids 0..255): needs >= "
                f"{EMBEDDED_VOCAB}, or give data.path=TOKENS.bin",
            )
        return
    count = path.stat().st_size // TOKEN_ITEMSIZE[data.dtype]
    if count < need:
        raise ConfigError(
            "data.path",
            f"{data.path} holds {count} tokens, shorter than one sequence: train.seq_len="
            f"{seq_len} needs >= {need}",
        )
    try:
        largest = max_token_id(path, data.dtype)
    except (OSError, ValueError) as exc:
        raise ConfigError("data.path", f"cannot map {data.path}: {exc}") from exc
    if largest >= vocab_size:
        raise ConfigError(
            "data.path",
            f"{data.path} holds token id {largest} >= model.vocab_size={vocab_size} (wrong "
            "tokenizer or data.dtype?)",
        )
