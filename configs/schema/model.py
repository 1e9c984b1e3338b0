"""Schema of the `model` group: a Llama-family decoder-only transformer."""

from dataclasses import dataclass
from typing import Literal

from configs.checks import check_bounds
from configs.errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    """Dimensions of a Llama/Mistral/Qwen2-family decoder. Presets live in configs/model/."""

    name: str = "custom"
    """Preset or model name; shown in plans and logs."""
    hf_config: str | None = None
    """A Hugging Face config.json, or a model directory holding one (with *.safetensors and
    tokenizer.json); its dimensions replace the preset's (explicit model.* overrides on the
    command line still win)."""
    init: Literal["random", "hf"] = "random"
    """Initial weights: random (seeded by train.seed, the same under every layout) or hf (the
    safetensors of the model.hf_config directory, each rank reading only what it holds)."""
    vocab_size: int = 256
    """Number of token ids."""
    hidden_size: int = 128
    """Model width (d_model)."""
    num_layers: int = 4
    """Number of decoder layers."""
    num_heads: int = 4
    """Query heads."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention); must divide num_heads."""
    ffn_size: int = 352
    """SwiGLU inner width."""
    head_dim: int | None = None
    """Per-head width; None means hidden_size // num_heads."""
    max_seq_len: int = 4096
    """Longest sequence the preset was trained for; a longer train.seq_len is allowed (memory
    plans at 1M tokens) with a one-line warning, which setting this key to the length meant
    silences."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rope_scaling: Literal["none", "llama3"] = "none"
    """RoPE frequency scaling rule ("llama3": Llama-3.1/3.2 long-context scaling)."""
    rope_scaling_factor: float = 1.0
    """llama3 scaling: overall factor."""
    rope_low_freq_factor: float = 1.0
    """llama3 scaling: low-frequency factor."""
    rope_high_freq_factor: float = 4.0
    """llama3 scaling: high-frequency factor."""
    rope_original_max_positions: int = 8192
    """llama3 scaling: context length before scaling."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the input embedding with the output projection."""
    qkv_bias: bool = False
    """Bias on the q/k/v projections (Qwen2; Llama with attention_bias)."""
    out_bias: bool = False
    """Bias on the attention output projection (Llama with attention_bias)."""
    init_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""

    def __post_init__(self) -> None:
        sizes = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads")
        lengths = ("max_seq_len", "rope_original_max_positions")
        check_bounds(self, "model", (*sizes, "ffn_size", *lengths), at_least=1)
        rope = ("rope_theta", "rope_scaling_factor", "rope_low_freq_factor")
        check_bounds(self, "model", (*rope, "rope_high_freq_factor", "norm_eps"), above=0)
        check_bounds(self, "model", ("init_std",), at_least=0)
        if (
            self.rope_scaling == "llama3"
            and self.rope_high_freq_factor <= self.rope_low_freq_factor
        ):
            # the blend between the two wavelengths divides by their difference
            raise ConfigError(
                "model.rope_high_freq_factor",
                f"must be > model.rope_low_freq_factor={self.rope_low_freq_factor:g} for llama3"
                f" scaling, got {self.rope_high_freq_factor:g}",
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                "model.num_kv_heads",
                f"num_heads={self.num_heads} must be divisible by num_kv_heads={self.num_kv_heads}",
            )
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ConfigError(
                "model.num_heads",
                f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}"
                " (or set model.head_dim)",
            )
        if self.head_dim is not None and (self.head_dim < 2 or self.head_dim % 2):
            raise ConfigError("model.head_dim", f"must be an even number >= 2, got {self.head_dim}")
        if self.resolved_head_dim % 2:
            raise ConfigError(
                "model.num_heads", f"head_dim={self.resolved_head_dim} must be even for RoPE"
            )

    @property
    def resolved_head_dim(self) -> int:
        """Per-head width after applying the hidden_size // num_heads default."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads
