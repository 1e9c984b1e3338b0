"""Write a Hugging Face config.json for a memplan ModelConfig: the inverse of configs/hf.py
(reading the written file back gives the same ModelConfig fields), in the spelling both
transformers 4.x and 5.x read (top-level rope_theta + rope_scaling)."""

from __future__ import annotations

from typing import Any

from configs.errors import ConfigError
from configs.schema.model import ModelConfig

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


def export_model_type(cfg: ModelConfig, source_type: str | None) -> str:
    """The family to write: qwen2 for biases on q/k/v only; otherwise the source checkpoint's
    family when it has this bias layout (Mistral: none), else llama (none, or all four)."""
    if cfg.qkv_bias and not cfg.out_bias:
        return "qwen2"
    if cfg.out_bias and not cfg.qkv_bias:
        raise ConfigError(
            "model.out_bias",
            "a bias on the output projection alone has no Hugging Face family (Llama has"
            " biases on all four projections or none, Qwen2 on q/k/v only)",
        )
    if source_type == "mistral" and not cfg.qkv_bias:
        return "mistral"
    return "llama"


def hf_config_json(cfg: ModelConfig, model_type: str, torch_dtype: str) -> dict[str, Any]:
    """config.json for `cfg` as transformers' `model_type` family (llama, mistral, qwen2)."""
    raw: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "attention_dropout": 0.0,
        "torch_dtype": torch_dtype,
    }
    if cfg.head_dim is not None:  # else transformers derives hidden_size // heads, as memplan
        raw["head_dim"] = cfg.head_dim
    if cfg.rope_scaling == "llama3":
        raw["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": cfg.rope_scaling_factor,
            "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_positions,
        }
    if model_type == "llama":
        # transformers' Llama has one flag for all four projections' biases
        raw["attention_bias"] = cfg.qkv_bias
        raw["mlp_bias"] = False
    elif model_type == "mistral":
        raw["sliding_window"] = None  # memplan's attention is full causal
    else:
        raw["use_sliding_window"] = False
        raw["sliding_window"] = None
    return raw
