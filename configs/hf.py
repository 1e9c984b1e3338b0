"""Read a Hugging Face config.json (Llama, Mistral, Qwen2 families) into ModelConfig fields."""

from pathlib import Path
from typing import Any

from configs.checks import read_json_object
from configs.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def _require(raw: dict[str, Any], key: str, path: str) -> Any:
    if key not in raw:
        raise ConfigError("model.hf_config", f"{path} has no '{key}'")
    return raw[key]


def read_hf_config(path: str) -> dict[str, Any]:
    """ModelConfig field values from a Hugging Face config.json.

    Supports GQA (num_key_value_heads), tied embeddings, attention biases (Llama's
    attention_bias on q/k/v/o; Qwen2's always-on q/k/v bias), explicit head_dim and rope
    settings (rope_theta, llama3 rope_scaling).
    """
    raw = read_json_object(path, "model.hf_config")
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            "model.hf_config",
            f"model_type={model_type!r} in {path}; allowed: {', '.join(SUPPORTED_MODEL_TYPES)}",
        )
    heads = _require(raw, "num_attention_heads", path)
    values: dict[str, Any] = {
        "name": Path(raw.get("_name_or_path") or Path(path).parent.name or model_type).name,
        "vocab_size": _require(raw, "vocab_size", path),
        "hidden_size": _require(raw, "hidden_size", path),
        "num_layers": _require(raw, "num_hidden_layers", path),
        "num_heads": heads,
        "num_kv_heads": raw.get("num_key_value_heads") or heads,
        "ffn_size": _require(raw, "intermediate_size", path),
        "head_dim": raw.get("head_dim"),
        "max_seq_len": raw.get("max_position_embeddings", 4096),
        "rope_theta": float(raw.get("rope_theta", 10000.0)),
        "norm_eps": float(raw.get("rms_norm_eps", 1e-5)),
        "tie_embeddings": bool(raw.get("tie_word_embeddings", False)),
    }
    if model_type == "qwen2":
        values["qkv_bias"], values["out_bias"] = True, False
    else:
        bias = bool(raw.get("attention_bias", False))
        values["qkv_bias"], values["out_bias"] = bias, bias
    scaling = raw.get("rope_scaling")
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "llama3":
            raise ConfigError(
                "model.hf_config", f"rope_scaling type {kind!r} in {path}; supported: llama3"
            )
        values.update(
            rope_scaling="llama3",
            rope_scaling_factor=float(scaling["factor"]),
            rope_low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
            rope_original_max_positions=int(scaling.get("original_max_position_embeddings", 8192)),
        )
    return values
