"""Compose and validate the config ONCE, in the launcher (the only place Hydra runs).

Every failure becomes a ConfigError with one line naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from configs import CONFIG_DIR
from configs.errors import ConfigError
from configs.hf import read_hf_config
from configs.hf_weights import check_hf_weights
from configs.schema import Config
from configs.structured import omegaconf_twin, to_typed

SCHEMA_NAME = "memplan_schema"
ConfigStore.instance().store(name=SCHEMA_NAME, node=omegaconf_twin(Config))


def _known_keys(dotted: str) -> list[str]:
    """Field names of the schema node that holds `dotted` (e.g. 'train.foo' -> TrainConfig)."""
    cls: Any = Config
    for part in dotted.split(".")[:-1]:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields or not dataclasses.is_dataclass(fields[part].default_factory):
            return []
        cls = fields[part].default_factory
    return sorted(f.name for f in dataclasses.fields(cls))


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "invalid value"


def _presets(group: str) -> list[str]:
    """Preset names of a config group (configs/<group>/*.yaml)."""
    return sorted(path.stem for path in (Path(CONFIG_DIR) / group).glob("*.yaml"))


def translate_hydra_error(exc: BaseException, overrides: Sequence[str]) -> ConfigError:
    """Turn a Hydra/OmegaConf composition failure into a one-line ConfigError."""
    if isinstance(exc, MissingConfigException):
        found = re.search(r"Could not (?:find|load) '([^'/]+)/([^']+)'", str(exc))
        if found:
            group, name = found.groups()
            options = _presets(group) or re.findall(r"^\t(\S+)$", str(exc), flags=re.M)
            return ConfigError(
                f"{group}={name}", f"unknown preset; available: {', '.join(sorted(options))}"
            )
        return ConfigError("config", _first_line(str(exc)))
    message = str(exc)
    unknown = re.match(r"Could not override '([^']+)'", message)
    if unknown:
        key = unknown.group(1)
        known = _known_keys(key) if "/" not in key and "@" not in key else []
        hint = f"; known keys here: {', '.join(known)}" if known else ""
        return ConfigError(key, f"unknown key{hint}")
    sweep = re.match(r"Ambiguous value for argument '([^=']+)=([^']*)'", message)
    if sweep:
        key, values = sweep.groups()
        return ConfigError(
            key, f"{values} is a sweep: memplan plan -m plans each value; give one value here"
        )
    taken = re.match(r"Could not append to config\. An item is already at '([^']+)'", message)
    if taken:
        key = taken.group(1)
        return ConfigError(f"+{key}", f"{key} exists already; override it as {key}=VALUE")
    chain: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    for err in chain:
        key = getattr(err, "full_key", None)
        if isinstance(err, OmegaConfBaseException) and key:
            message = _first_line(getattr(err, "msg", None) or str(err))
            if "not in" in message and "Key" in message:
                known = _known_keys(key)
                hint = f"; known keys here: {', '.join(known)}" if known else ""
                return ConfigError(key, f"unknown key{hint}")
            return ConfigError(key, message)
    if "Error parsing override" in str(exc):
        bad = re.search(r"Error parsing override '([^']*)'", str(exc))
        return ConfigError(
            bad.group(1) if bad else "override", "cannot parse; write overrides as key=value"
        )
    return ConfigError("config", _first_line(str(exc)))


def _explicit_model_keys(overrides: Sequence[str]) -> set[str]:
    keys = set()
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key.startswith("model."):
            keys.add(key.removeprefix("model."))
    return keys


def _parse_detail(exc: BaseException) -> str:
    """What Hydra's override parser objects to, shortened to a phrase."""
    for line in str(exc).splitlines():
        line = line.strip()
        if not line or line.startswith(("Error parsing override", "See https", "^")):
            continue
        if line.startswith("LexerNoViableAltException"):
            return "a character that needs quoting"
        return line.split(" expecting ")[0]
    return "unparsable"


def check_overrides(overrides: Sequence[str]) -> None:
    """Parse each override on its own, so a malformed one is named: `=5` (no key),
    `train.seq_len` (no value), `model=tiny,` (a dangling comma)."""
    parser = OverridesParser.create()
    for override in overrides:
        guess = override.split("=", 1)[0].lstrip("~+") or override
        try:
            (parsed,) = parser.parse_overrides([override])
        except HydraException as exc:
            value = override.split("=", 1)[1] if "=" in override else ""
            hint = (
                "; quote list items that hold '=' or spaces: key='[\"--mem=0\"]'"
                if value.startswith("[") and ("=" in value or " " in value)
                else "; write key=value"
            )
            raise ConfigError(
                guess, f"cannot parse {override!r} ({_parse_detail(exc)}){hint}"
            ) from exc
        if not parsed.key_or_group:
            raise ConfigError(
                "override",
                f"{override!r} has no key; write overrides as key=value (e.g. train.seq_len=4096)",
            )
        if parsed.is_delete():  # the typed schema would fill the gap with its defaults, unseen
            raise ConfigError(f"~{parsed.key_or_group}", _no_deletion(parsed.key_or_group))


def _no_deletion(key: str) -> str:
    """Why `~key` is refused and what to write instead."""
    presets = _presets(key) if "." not in key and "/" not in key else []
    if presets:
        return (
            f"a config group cannot be deleted (its schema defaults would replace it silently);"
            f" choose a preset: {key}={'|'.join(presets)}"
        )
    known = _known_keys(key)
    if key.split(".")[-1] not in known:
        return f"unknown key; known keys here: {', '.join(known)}" if known else "unknown key"
    if _known_keys(f"{key}.x"):  # a node of keys such as `data`
        return f"a config node cannot be deleted; set its keys instead: {key}.KEY=VALUE"
    return f"keys cannot be deleted (every key has a value); set one: {key}=VALUE"


def compose_raw(overrides: Sequence[str]) -> dict[str, Any]:
    """The composed config as a plain dict (defaults + presets + overrides), not yet typed."""
    check_overrides(overrides)
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            composed: DictConfig = compose("config", overrides=list(overrides))
            raw = OmegaConf.to_container(composed, resolve=True)
    except (HydraException, OmegaConfBaseException) as exc:
        raise translate_hydra_error(exc, overrides) from exc
    except ValueError as exc:  # Hydra's own checks of override values (e.g. `model=5`)
        raise ConfigError("override", f"{_first_line(str(exc))} ({' '.join(overrides)})") from exc
    assert isinstance(raw, dict)
    raw.pop("hydra", None)
    return raw


def compose_config(overrides: Sequence[str]) -> Config:
    """Compose configs/ with Hydra overrides and return the validated, typed Config.

    `model.hf_config=PATH` (a config.json or a model directory) replaces the preset's
    dimensions with those in the JSON file; model.* keys given explicitly on the command line
    still win (e.g. fewer layers). With model.init=hf the directory's safetensors headers are
    checked against the model now (configs/hf_weights.py).
    """
    raw = compose_raw(overrides)
    hf_path = raw["model"].get("hf_config")
    if hf_path:
        explicit = _explicit_model_keys(overrides)
        for key, value in read_hf_config(hf_path).items():
            if key not in explicit:
                raw["model"][key] = value
    config = to_typed(raw, Config)
    if config.model.init == "hf":
        check_hf_weights(config.model)  # headers only: a missing shard is exit 2 here
    return config


def config_notes(cfg: Config) -> list[str]:
    """Warnings (one line each, naming the key) about a valid config that may not be meant."""
    notes = []
    if cfg.train.seq_len > cfg.model.max_seq_len:
        notes.append(
            f"train.seq_len: {cfg.train.seq_len} is longer than model.max_seq_len="
            f"{cfg.model.max_seq_len}, the context {cfg.model.name} was trained for; positions"
            " beyond it are untrained (set model.max_seq_len to say this is meant)"
        )
    return notes


def warn_config(cfg: Config, out: Any = None) -> None:
    """Print each of config_notes as one `memplan: warning:` line on stderr."""
    for note in config_notes(cfg):
        print(f"memplan: warning: {note}", file=out or sys.stderr)


def load_resolved(path: str) -> Config:
    """Load a resolved.yaml written by the launcher (workers use this; they never run Hydra)."""
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except OSError as exc:
        raise ConfigError("resolved config", f"cannot read {path}: {exc.strerror}") from exc
    if not isinstance(raw, dict):
        raise ConfigError("resolved config", f"{path} does not hold a mapping")
    return to_typed(raw, Config)


def dump_resolved(config: Config) -> str:
    """The typed config as YAML (written next to the run as resolved.yaml)."""
    return OmegaConf.to_yaml(OmegaConf.create(dataclasses.asdict(config)))
