"""Load a Hugging Face checkpoint (safetensors) into a meta-built, already parallelised model.

Every rank reads only what it holds: the tensors of its pipeline stage, and of each tensor
only its own FSDP2 shard / tensor-parallel slice (safetensors' get_slice reads those rows
and columns from the memory-mapped file). Files are opened one at a time, so the memory a
rank needs beyond its own parameters is at most one shard file's mapped pages.

Placements that are not plain Shard/Replicate (a strided shard: FSDP2 over a
tensor-parallel dimension of the same axis) take the whole tensor and let
`distribute_tensor` cut it, one tensor at a time.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from torch import Tensor, nn

from configs.hf_weights import TensorEntry, check_hf_weights, memplan_to_hf_name
from configs.schema import ModelConfig
from framework.components.model import copy_into_local
from framework.components.rope import rope_inverse_frequencies

EMBEDDING = "tok_embeddings.weight"
OUTPUT = "output.weight"


def _hf_source(name: str, cfg: ModelConfig) -> str:
    """The Hugging Face tensor a parameter loads: its own name, except a tied output
    projection (a pipeline's last-stage copy of the embedding) which loads the embedding."""
    if name == OUTPUT and cfg.tie_embeddings:
        return memplan_to_hf_name(EMBEDDING)
    return memplan_to_hf_name(name)


def _local_region(param: Tensor) -> tuple[Tensor, tuple[slice, ...]] | None:
    """(the rank's local tensor, the global index region it holds), or None when the
    placements are not plain Shard/Replicate."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(param, DTensor):
        return param.data, tuple(slice(0, size) for size in param.shape)
    if any(type(p) not in (Shard, Replicate) for p in param.placements):
        return None
    shape, offset = compute_local_shape_and_global_offset(
        param.shape, param.device_mesh, param.placements
    )
    local = param.to_local()
    if tuple(local.shape) != tuple(shape):  # not the layout computed above: cut the whole
        return None
    return local, tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))


@torch.no_grad()
def _load_file(path: Path, targets: list[tuple[str, Tensor]]) -> None:
    """Copy each (hf name, parameter) of one safetensors file into the parameter."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as stored:
        for hf_name, param in targets:
            region = _local_region(param)
            if region is None:
                copy_into_local(param, stored.get_tensor(hf_name).to(param.dtype))
                continue
            local, index = region
            if local.numel() == 0:  # an uneven shard can leave a rank nothing
                continue
            local.copy_(stored.get_slice(hf_name)[index].to(local.device, local.dtype))


def load_hf_weights(model: nn.Module, cfg: ModelConfig) -> None:
    """Fill every parameter of `model` (a Transformer or a pipeline stage of it; FSDP2, TP or
    plain) from the safetensors of cfg.hf_config, and its RoPE buffer from cfg."""
    stored: dict[str, TensorEntry] = check_hf_weights(cfg)
    by_file: dict[Path, list[tuple[str, Tensor]]] = defaultdict(list)
    for name, param in model.named_parameters():
        hf_name = _hf_source(name, cfg)
        by_file[stored[hf_name].file].append((hf_name, param))
    for path in sorted(by_file):
        _load_file(path, by_file[path])
    with torch.no_grad():
        model.rope_inv_freq.copy_(rope_inverse_frequencies(cfg))
