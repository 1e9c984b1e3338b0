"""Checks of user input that every layer shares: numeric bounds of dataclass fields and JSON
files. Each failure is a one-line ConfigError naming the full key and what is allowed."""

from __future__ import annotations

import functools
import json
import math
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from configs.errors import ConfigError
from configs.structured import is_optional, type_name


@functools.cache
def _numeric_fields(cls: type) -> dict[str, tuple[type, bool]]:
    """(int or float, whether None is allowed) of each int/float field of dataclass `cls`."""
    kinds = {}
    for name, hint in typing.get_type_hints(cls).items():
        nullable, inner = is_optional(hint)
        if inner in (int, float):
            kinds[name] = (inner, nullable)
    return kinds


def _allowed(
    at_least: float | None, above: float | None, at_most: float | None, below: float | None
) -> str:
    """The bounds as users read them: ">= 1", "> 0", "in (0, 1]", "in [0, 1)"."""
    if (at_least is not None and above is not None) or (at_most is not None and below is not None):
        raise TypeError("one lower bound (at_least or above) and one upper (at_most or below)")
    low, high = (at_least if above is None else above), (at_most if below is None else below)
    if low is not None and high is not None:
        opening, closing = "[" if above is None else "(", "]" if below is None else ")"
        return f"in {opening}{low}, {high}{closing}"
    if low is not None:
        return f">= {low}" if above is None else f"> {low}"
    if high is not None:
        return f"<= {high}" if below is None else f"< {high}"
    raise TypeError("check_bounds needs a bound")


def check_bounds(
    config: object,
    prefix: str,
    names: Iterable[str],
    *,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    below: float | None = None,
) -> None:
    """Raise ConfigError for the first field of `config` in `names` that is out of bounds.

    The key is `prefix.name` ("cluster.gpus_per_node"); the message names what is allowed and
    what was given: "must be >= 1, got 0", "must be in (0, 1], got 1.5", "must be >= 1 or
    null, got -2". Each field's annotation says what it takes: an `int` field integers only, a
    `float` field integers or floats, never a bool; `X | None` also takes None. NaN and the
    infinities are out of every bound (a learning rate of inf is no more a number than nan).
    """
    allowed = _allowed(at_least, above, at_most, below)
    kinds = _numeric_fields(type(config))
    for name in names:
        if name not in kinds:
            raise TypeError(f"{type(config).__name__}.{name} is not an int or float field")
        kind, nullable = kinds[name]
        value = getattr(config, name)
        if value is None and nullable:
            continue
        key, or_null = f"{prefix}.{name}", " or null" if nullable else ""
        wanted = int if kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, wanted):
            raise ConfigError(key, f"must be {type_name(kind)} {allowed}{or_null}, got {value!r}")
        within = (isinstance(value, int) or math.isfinite(value)) and (
            (at_least is None or value >= at_least)
            and (above is None or value > above)
            and (at_most is None or value <= at_most)
            and (below is None or value < below)
        )
        if not within:
            raise ConfigError(key, f"must be {allowed}{or_null}, got {value}")


def read_json_object(path: str | Path, key: str, kind: str = "a JSON") -> dict[str, Any]:
    """The JSON object in the file `path`; a ConfigError under `key` ("plan.path") when the file
    cannot be read, is not UTF-8 text ("... is not {kind} file"), is not JSON or holds
    something other than an object."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from exc
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(
            key, f"{path} is not {kind} file (not UTF-8 text: byte {exc.start})"
        ) from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(key, f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})") from exc
    if not isinstance(data, dict):
        raise ConfigError(key, f"{path} does not hold a JSON object")
    return data
