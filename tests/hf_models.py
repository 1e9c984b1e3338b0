"""Tiny Hugging Face models built locally by transformers (the test oracle; nothing is
downloaded): random weights everywhere, biases and norms included, saved with
save_pretrained in one file or several shards."""

from __future__ import annotations

from pathlib import Path

import torch

TINY = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
)  # fmt: skip
"""256 token ids: the embedded corpus (bytes) trains it."""
LLAMA3 = {
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
}  # fmt: skip


def families() -> dict[str, tuple[type, dict]]:
    """name -> (transformers config class, its extra settings): llama with llama3 scaling,
    qwen2 (q/k/v biases) with tied embeddings, mistral without a sliding window."""
    import transformers

    return {
        "llama_llama3": (transformers.LlamaConfig, dict(rope_parameters=LLAMA3)),
        "qwen2_bias_tied": (
            transformers.Qwen2Config,
            dict(
                rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                tie_word_embeddings=True,
            ),
        ),
        "mistral": (
            transformers.MistralConfig,
            dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6}, sliding_window=None),
        ),
    }


FAMILY_NAMES = ("llama_llama3", "qwen2_bias_tied", "mistral")


def build_hf_model(
    family: str, directory: Path, max_shard_size: str | None = None, **sizes: int
) -> torch.nn.Module:
    """A tiny transformers model of `family` with random weights, saved to `directory` (in
    shards of at most max_shard_size, e.g. "40KB"); returned in eval mode."""
    import transformers

    config_class, extra = families()[family]
    config = config_class(**{**TINY, **sizes}, **extra, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            base = 1.0 if name.endswith("norm.weight") else 0.0
            param.copy_(base + 0.1 * torch.randn_like(param))
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(directory, **kwargs)
    return model
