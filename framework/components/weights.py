"""The initial weights of a meta-built, already parallelised model: random, or a Hugging Face
checkpoint (model.init=hf). The one call every runtime makes after `to_empty()`."""

from __future__ import annotations

from torch import nn

from configs.schema import ModelConfig


def initialize_weights(model: nn.Module, cfg: ModelConfig, seed: int) -> None:
    """Fill every parameter of `model` (a Transformer or a pipeline stage of it, possibly
    sharded): `init_weights(seed)` for model.init=random; for model.init=hf the tensors of
    the model.hf_config directory, each rank reading only the slices it holds
    (framework/components/hf_load.py)."""
    if cfg.init == "hf":
        from framework.components.hf_load import load_hf_weights

        assert cfg.hf_config is not None, "model.init=hf is checked to name a directory"
        load_hf_weights(model, cfg)
        return
    model.init_weights(seed)
