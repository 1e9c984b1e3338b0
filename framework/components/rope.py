"""Rotary position embedding frequencies (with Llama-3 long-context scaling)."""

import math

import torch
from torch import Tensor

from configs.schema import ModelConfig


def rope_inverse_frequencies(cfg: ModelConfig) -> Tensor:
    """Inverse frequencies [head_dim / 2] in fp32, scaled per cfg.rope_scaling."""
    dim = cfg.resolved_head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if cfg.rope_scaling == "llama3":
        factor = cfg.rope_scaling_factor
        low_wavelen = cfg.rope_original_max_positions / cfg.rope_low_freq_factor
        high_wavelen = cfg.rope_original_max_positions / cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths are slowed down by `factor`, short ones kept, the middle blended
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (cfg.rope_original_max_positions / wavelen - cfg.rope_low_freq_factor) / (
            cfg.rope_high_freq_factor - cfg.rope_low_freq_factor
        )
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(is_medium, blended, scaled)
    return inv_freq.float()


def rope_tables(
    inv_freq: Tensor, start: int, length: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos and sin [length, head_dim] for positions start..start+length-1, in `dtype`.

    Computed once per forward and shared by every layer, so they cost one pair of tables.
    """
    positions = torch.arange(start, start + length, device=inv_freq.device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)
