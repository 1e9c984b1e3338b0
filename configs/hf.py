"""Read a Hugging Face config.json (Llama, Mistral, Qwen2 families) into ModelConfig fields.

The file is read the way transformers reads it, 4.x and 5.x alike; a key that is absent takes
the default of transformers' config class for that family. Every key that changes what the
model computes is read, refused (a ConfigError: one line, exit 2) or, where memplan's model
still computes the same function, passed over with a one-line warning that says why:

    read     sizes, head_dim, rms_norm_eps, tie_word_embeddings, attention_bias (Llama), and
             RoPE in either spelling: rope_parameters (transformers 5) or rope_theta +
             rope_scaling (older files), rope types "default" and "llama3"
    refused  any other rope type (yarn, dynamic, linear, longrope, ...); two spellings of one
             RoPE setting that disagree; partial_rotary_factor != 1; hidden_act other than
             silu; mlp_bias (Llama); an active sliding window (Mistral sliding_window, Qwen2
             use_sliding_window); a key read with the wrong type or value
    warned   attention_dropout > 0 (a training regulariser, not part of the function);
             attention_bias on Mistral/Qwen2 (transformers ignores it there too); a Mistral
             file without sliding_window (transformers would assume a 4096-token window)

Keys that change nothing memplan builds (pretraining_tp, use_cache, token ids, dtype,
initializer_range) are not looked at.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from configs.checks import read_json_object
from configs.errors import ConfigError
from configs.schema.model import ModelConfig

logger = logging.getLogger(__name__)

KEY = "model.hf_config"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "llama3")
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_FAMILY_NAMES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
_ROPE_KEYS = ("rope_type", "type", "rope_theta", "partial_rotary_factor")

# What transformers' config classes assume when a key is absent (identical in 4.x and 5.x).
_ABSENT_KV_HEADS = {"llama": None, "mistral": 8, "qwen2": 32}  # None: num_attention_heads
_ABSENT_MAX_POSITIONS = {"llama": 2048, "mistral": 131072, "qwen2": 32768}
_ABSENT_THETA = 10000.0
_ABSENT_NORM_EPS = 1e-6
_ABSENT_SLIDING_WINDOW = 4096  # Mistral and Qwen2
_ABSENT_MAX_WINDOW_LAYERS = 28  # Qwen2: layers from this index on use the window
_REQUIRED = object()


def _show(value: Any) -> str:
    """A value as config.json spells it (true, null, "abc"), cut short for one line."""
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _HfFile:
    """One config.json: its top-level object and typed, one-line-error reads of its keys."""

    def __init__(self, path: str, raw: dict[str, Any]) -> None:
        self.path = path
        self.raw = raw

    def error(self, key: str, value: Any, wanted: str) -> ConfigError:
        return ConfigError(KEY, f"{key}={_show(value)} in {self.path}: {wanted}")

    def warn(self, key: str, value: Any, why: str) -> None:
        logger.warning("%s: %s=%s in %s is ignored: %s", KEY, key, _show(value), self.path, why)

    def get(self, name: str, default: Any, obj: dict[str, Any] | None, prefix: str) -> Any:
        obj = self.raw if obj is None else obj
        if name in obj:
            return obj[name]
        if default is _REQUIRED:
            raise ConfigError(KEY, f"{self.path} has no '{prefix}{name}'")
        return default

    def integer(
        self,
        name: str,
        default: Any = _REQUIRED,
        *,
        obj: dict | None = None,
        prefix: str = "",
        nullable: bool = False,
    ) -> int | None:
        """An integer >= 1 (or null where `nullable`)."""
        value = self.get(name, default, obj, prefix)
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            or_null = " or null" if nullable else ""
            raise self.error(prefix + name, value, f"must be an integer >= 1{or_null}")
        return value

    def number(
        self,
        name: str,
        default: Any = _REQUIRED,
        *,
        obj: dict | None = None,
        prefix: str = "",
        zero: bool = False,
    ) -> float:
        """A finite number > 0 (>= 0 with zero=True)."""
        value = self.get(name, default, obj, prefix)
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        if not numeric or not math.isfinite(value) or value < 0 or (value == 0 and not zero):
            raise self.error(prefix + name, value, f"must be a number {'>=' if zero else '>'} 0")
        return float(value)

    def flag(self, name: str, default: bool) -> bool:
        value = self.get(name, default, None, "")
        if not isinstance(value, bool):
            raise self.error(name, value, "must be true or false")
        return value

    def text(
        self, name: str, default: Any = _REQUIRED, *, obj: dict | None = None, prefix: str = ""
    ) -> str:
        value = self.get(name, default, obj, prefix)
        if not isinstance(value, str):
            raise self.error(prefix + name, value, "must be a string")
        return value


def _agree(file: _HfFile, spellings: list[tuple[str, Any]], default: Any) -> Any:
    """The one value that every present spelling of a setting gives (`default` if none)."""
    for key, value in spellings[1:]:
        if value != spellings[0][1]:
            first_key, first_value = spellings[0]
            raise ConfigError(
                KEY,
                f"{first_key}={_show(first_value)} and {key}={_show(value)} in {file.path}"
                " disagree; keep one spelling (transformers 5 writes rope_parameters, older"
                " files rope_theta + rope_scaling)",
            )
    return spellings[0][1] if spellings else default


def _rope_object(file: _HfFile, name: str) -> dict[str, Any] | None:
    """rope_parameters or rope_scaling as a dict; None when absent or null."""
    value = file.raw.get(name)
    if value is not None and not isinstance(value, dict):
        raise file.error(name, value, 'must be an object like {"rope_type": "llama3", ...} or null')
    return value


def _rope_type(file: _HfFile, name: str, spec: dict[str, Any]) -> str:
    """The rope type of one rope object, refusing types and keys that memplan does not read."""
    # "type" is the older name of "rope_type"; transformers reads either
    kinds = [
        (f"{name}.{key}", file.text(key, obj=spec, prefix=f"{name}."))
        for key in ("rope_type", "type")
        if key in spec
    ]
    kind = _agree(file, kinds, "default")
    if kind not in SUPPORTED_ROPE_TYPES:
        raise file.error(
            kinds[0][0], kind, f"memplan implements rope types {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    allowed = (*_ROPE_KEYS, *(LLAMA3_KEYS if kind == "llama3" else ()))
    unread = sorted(set(spec) - set(allowed))
    if unread:
        raise ConfigError(
            KEY,
            f"{name} in {file.path} has keys memplan does not read: {', '.join(unread)};"
            f" rope type {kind!r} takes {', '.join(allowed)}",
        )
    return kind


def _rope_scaling(file: _HfFile, name: str, spec: dict[str, Any]) -> tuple[Any, ...]:
    """(type, factor, low, high, original max positions or None) of one rope object."""
    kind = _rope_type(file, name, spec)
    if kind == "default":
        return ("default", None, None, None, None)
    prefix = f"{name}."
    missing = [key for key in LLAMA3_KEYS[:3] if key not in spec]
    if missing:
        raise ConfigError(
            KEY,
            f"{file.path} has no '{prefix}{missing[0]}'; llama3 scaling needs factor,"
            " low_freq_factor and high_freq_factor",
        )
    factor, low, high = (file.number(key, obj=spec, prefix=prefix) for key in LLAMA3_KEYS[:3])
    if high <= low:
        raise file.error(f"{prefix}high_freq_factor", high, f"must be > low_freq_factor={low}")
    original = file.integer(LLAMA3_KEYS[3], None, obj=spec, prefix=prefix, nullable=True)
    return ("llama3", factor, low, high, original)


def _rope_values(file: _HfFile, max_positions: int) -> dict[str, Any]:
    """The rope_* ModelConfig fields, from rope_parameters and/or rope_theta + rope_scaling."""
    objects = {name: _rope_object(file, name) for name in ("rope_parameters", "rope_scaling")}
    present = {name: spec for name, spec in objects.items() if spec is not None}

    # partial_rotary_factor: top level (older files) or inside a rope object
    for name, obj in (("", file.raw), *((f"{n}.", spec) for n, spec in present.items())):
        if "partial_rotary_factor" in obj:
            value = file.number("partial_rotary_factor", obj=obj, prefix=name)
            if value != 1.0:
                raise file.error(
                    f"{name}partial_rotary_factor", value, "memplan rotates the whole head (1.0)"
                )

    thetas = [("rope_theta", file.number("rope_theta"))] if "rope_theta" in file.raw else []
    for name, spec in present.items():
        if "rope_theta" in spec:
            thetas.append(
                (f"{name}.rope_theta", file.number("rope_theta", obj=spec, prefix=f"{name}."))
            )
    theta = _agree(file, thetas, _ABSENT_THETA)

    # [Agreement] rope_parameters and rope_scaling, field by field
    scalings = {name: _rope_scaling(file, name, spec) for name, spec in present.items()}
    if len(scalings) == 2:
        fields = ("rope_type", *LLAMA3_KEYS)
        for field, new, old in zip(fields, *scalings.values(), strict=True):
            _agree(file, [(f"rope_parameters.{field}", new), (f"rope_scaling.{field}", old)], None)
    kind, factor, low, high, original = next(iter(scalings.values()), ("default",) + (None,) * 4)

    defaults = ModelConfig()
    values: dict[str, Any] = {
        "rope_theta": theta,
        "rope_scaling": "none",
        "rope_scaling_factor": defaults.rope_scaling_factor,
        "rope_low_freq_factor": defaults.rope_low_freq_factor,
        "rope_high_freq_factor": defaults.rope_high_freq_factor,
        "rope_original_max_positions": defaults.rope_original_max_positions,
    }
    if kind == "llama3":
        name = next(iter(scalings))
        originals = [(f"{name}.original_max_position_embeddings", original)] if original else []
        if "original_max_position_embeddings" in file.raw:  # a top-level copy wins in transformers
            top = file.integer("original_max_position_embeddings")
            originals.insert(0, ("original_max_position_embeddings", top))
        values.update(
            rope_scaling="llama3",
            rope_scaling_factor=factor,
            rope_low_freq_factor=low,
            rope_high_freq_factor=high,
            # transformers fills an absent original context length with max_position_embeddings
            rope_original_max_positions=_agree(file, originals, max_positions),
        )
    return values


def _check_sliding_window(file: _HfFile, family: str, num_layers: int) -> None:
    """Refuse an active sliding window: memplan's attention is full causal."""
    why = (
        "memplan's attention is full causal, the same only for sequences up to {w} tokens;"
        " set {key} to {off} in a copy of the file to train with full attention"
    )
    if family == "mistral":
        if "sliding_window" not in file.raw:
            logger.warning(
                "%s: %s has no sliding_window; transformers' Mistral would assume %d tokens,"
                " memplan attends over the whole sequence (the same up to %d tokens)",
                KEY, file.path, _ABSENT_SLIDING_WINDOW, _ABSENT_SLIDING_WINDOW,
            )  # fmt: skip
            return
        window = file.integer("sliding_window", nullable=True)
        if window is not None:
            raise file.error(
                "sliding_window", window, why.format(w=window, key="sliding_window", off="null")
            )
    elif family == "qwen2" and file.flag("use_sliding_window", False):
        window = file.integer("sliding_window", _ABSENT_SLIDING_WINDOW, nullable=True)
        if window is None:
            return
        layer_types = file.get("layer_types", None, None, "")
        if layer_types is None:
            first = file.get("max_window_layers", _ABSENT_MAX_WINDOW_LAYERS, None, "")
            if isinstance(first, bool) or not isinstance(first, int) or first < 0:
                raise file.error("max_window_layers", first, "must be an integer >= 0")
            sliding = first < num_layers
        elif isinstance(layer_types, list):
            sliding = "sliding_attention" in layer_types
        else:
            raise file.error("layer_types", layer_types, "must be a list of strings or null")
        if sliding:
            raise file.error(
                "use_sliding_window",
                True,
                f"some layers attend to the last {window} tokens only; "
                + why.format(w=window, key="use_sliding_window", off="false"),
            )


def _attention_bias(file: _HfFile, family: str) -> tuple[bool, bool]:
    """(qkv_bias, out_bias) as transformers builds the family's attention projections."""
    if family == "llama":
        bias = file.flag("attention_bias", False)
        return bias, bias
    fixed = {"mistral": (False, False), "qwen2": (True, False)}[family]
    layout = {"mistral": "no attention biases", "qwen2": "biases on q/k/v only"}[family]
    if "attention_bias" in file.raw and (family == "qwen2" or file.flag("attention_bias", False)):
        file.warn(
            "attention_bias",
            file.raw["attention_bias"],
            f"transformers' {_FAMILY_NAMES[family]} ignores it too and always has {layout}",
        )
    return fixed


def config_json_path(path: str) -> str:
    """model.hf_config's config.json: the path itself, or DIR/config.json for a model
    directory (ConfigError when the directory has none)."""
    if not Path(path).is_dir():
        return path
    candidate = Path(path) / "config.json"
    if not candidate.is_file():
        raise ConfigError(KEY, f"{path} is a directory without a config.json")
    return str(candidate)


def model_directory(path: str | None) -> Path | None:
    """The directory model.hf_config names (a directory, or the one holding config.json)."""
    if path is None:
        return None
    return Path(path) if Path(path).is_dir() else Path(path).parent


def _read_object(path: str) -> dict[str, Any]:
    return read_json_object(path, KEY, kind="a config.json")


def read_model_type(path: str) -> str:
    """The model_type of a supported config.json (llama, mistral or qwen2)."""
    family = _read_object(config_json_path(path)).get("model_type")
    if family not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            KEY, f"model_type={family!r} in {path}; allowed: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return family


def read_hf_config(path: str) -> dict[str, Any]:
    """ModelConfig field values from a Hugging Face config.json, or a model directory holding
    one (see the module doc for which keys are read, refused or warned about).

    Every rope_* and bias field is returned, so nothing of the preset the file replaces leaks
    through (a Qwen2 file over the llama3_2_1b preset has no llama3 scaling).
    """
    path = config_json_path(path)
    family = read_model_type(path)
    file = _HfFile(path, _read_object(path))
    heads = file.integer("num_attention_heads")
    num_layers = file.integer("num_hidden_layers")
    max_positions = file.integer("max_position_embeddings", _ABSENT_MAX_POSITIONS[family])
    hidden_act = file.text("hidden_act", "silu")
    if hidden_act not in ("silu", "swish"):
        raise file.error("hidden_act", hidden_act, "memplan's MLP is SwiGLU (silu)")
    if family == "llama" and file.flag("mlp_bias", False):
        raise file.error("mlp_bias", True, "memplan's SwiGLU MLP has no biases")
    if file.number("attention_dropout", 0.0, zero=True) > 0:
        file.warn(
            "attention_dropout",
            file.raw["attention_dropout"],
            "memplan trains without attention dropout, a training regulariser that leaves the"
            " function (the logits) unchanged",
        )
    _check_sliding_window(file, family, num_layers)
    # absent: the family's default; null: as many as query heads
    kv_heads = file.integer("num_key_value_heads", _ABSENT_KV_HEADS[family], nullable=True)
    stated_name = file.raw.get("_name_or_path")
    stated_name = stated_name if isinstance(stated_name, str) else None
    values: dict[str, Any] = {
        "name": Path(stated_name or Path(path).parent.name or family).name,
        "vocab_size": file.integer("vocab_size"),
        "hidden_size": file.integer("hidden_size"),
        "num_layers": num_layers,
        "num_heads": heads,
        "num_kv_heads": kv_heads or heads,
        "ffn_size": file.integer("intermediate_size"),
        "head_dim": file.integer("head_dim", None, nullable=True),
        "max_seq_len": max_positions,
        "norm_eps": file.number("rms_norm_eps", _ABSENT_NORM_EPS),
        "tie_embeddings": file.flag("tie_word_embeddings", False),
    }
    values["qkv_bias"], values["out_bias"] = _attention_bias(file, family)
    values.update(_rope_values(file, max_positions))
    return values
