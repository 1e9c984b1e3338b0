"""Checks of a token file (data.path) that need neither torch nor numpy, so the launcher can
refuse a missing or malformed file before it writes a run directory or starts torchrun."""

from __future__ import annotations

from pathlib import Path

from configs.errors import ConfigError
from configs.schema import DataConfig

TOKEN_ITEMSIZE = {"uint16": 2, "uint32": 4}


def check_token_file(data: DataConfig) -> Path | None:
    """The token file's path, None for the embedded corpus; ConfigError (data.path) when the
    file is missing, unreadable, empty or not a whole number of data.dtype items."""
    if data.path is None:
        return None
    path = Path(data.path)
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
