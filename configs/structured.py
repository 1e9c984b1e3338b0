"""Bridge between the typed schemas and OmegaConf.

The schemas use `Literal[...]` for choices, which OmegaConf cannot type-check, so each schema
gets an OmegaConf-compatible *twin* (Literal becomes str) for Hydra's ConfigStore: unknown keys
and wrong types then fail while composing. `to_typed` turns a composed config (or a loaded
resolved.yaml) into the frozen typed dataclasses, checking choices and the schemas' own
`__post_init__` rules. One schema definition serves Hydra, workers and tests.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

from configs.errors import ConfigError

T = TypeVar("T")


def is_optional(tp: Any) -> tuple[bool, Any]:
    """(True, X) for `X | None` / Optional[X], else (False, tp)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _twin_type(tp: Any) -> Any:
    optional, inner = is_optional(tp)
    if typing.get_origin(inner) is Literal:
        inner = str
    elif dataclasses.is_dataclass(inner):
        inner = omegaconf_twin(inner)
    return inner | None if optional else inner


@functools.cache
def omegaconf_twin(cls: type) -> type:
    """An OmegaConf-compatible copy of a typed schema dataclass (Literal[...] becomes str)."""
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        tp = _twin_type(hints[f.name])
        if f.default_factory is not dataclasses.MISSING:
            inner_cls = is_optional(hints[f.name])[1]
            if dataclasses.is_dataclass(inner_cls):
                default = dataclasses.field(default_factory=omegaconf_twin(inner_cls))
            else:
                default = dataclasses.field(default_factory=f.default_factory)
        else:
            default = dataclasses.field(default=f.default)
        specs.append((f.name, tp, default))
    return dataclasses.make_dataclass(cls.__name__, specs)


def type_name(tp: Any) -> str:
    """How a message names a type: "an integer", "a number", "true or false", "a string"."""
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _convert(value: Any, tp: Any, key: str) -> Any:
    optional, inner = is_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(key, f"must not be null; expected {type_name(inner)}")
    if typing.get_origin(inner) in (tuple, list):
        (item_type, *_rest) = typing.get_args(inner)
        if isinstance(value, str | bytes | Mapping) or not hasattr(value, "__iter__"):
            raise ConfigError(key, f"expected a list, got {value!r}")
        items = [_convert(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if typing.get_origin(inner) is tuple else items
    if dataclasses.is_dataclass(inner):
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"expected a mapping of {inner.__name__} keys, got {value!r}")
        return to_typed(value, inner, key)
    if typing.get_origin(inner) is Literal:
        choices = typing.get_args(inner)
        if value not in choices:
            allowed = ", ".join(str(c) for c in choices)
            raise ConfigError(key, f"got {value!r}; allowed: {allowed}")
        return value
    if inner is bool:
        if isinstance(value, bool):
            return value
    elif inner is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif inner is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif inner is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(key, f"expected {type_name(inner)}, got {value!r}")


def to_typed(values: Mapping[str, Any], cls: type[T], prefix: str = "") -> T:
    """Build the typed dataclass `cls` from a plain mapping, rejecting unknown keys.

    Raises ConfigError naming the dotted key (e.g. "train.seq_len") and what is allowed.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            where = prefix or "config"
            raise ConfigError(
                f"{prefix}.{key}" if prefix else str(key),
                f"unknown key; known keys in {where}: {', '.join(sorted(names))}",
            )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        dotted = f"{prefix}.{f.name}" if prefix else f.name
        kwargs[f.name] = _convert(values[f.name], hints[f.name], dotted)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # a schema rule phrased as a plain error
        raise ConfigError(prefix or "config", str(exc)) from exc


def to_plain(config: Any) -> dict[str, Any]:
    """The typed config as nested plain dicts (for YAML, JSON and wandb)."""
    return dataclasses.asdict(config)
