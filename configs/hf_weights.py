"""The weights of a Hugging Face model directory (*.safetensors, one file or sharded with
model.safetensors.index.json), read without torch: which file holds which tensor, each
tensor's dtype and shape (from the safetensors headers only), and the map between Hugging
Face's tensor names and memplan's parameter names for the Llama, Mistral and Qwen2 families.

`check_hf_weights` runs before any worker starts (launch/compose.py, model.init=hf), so a
missing shard, a missing tensor or a shape that does not match the configured model is one
line naming the file and the tensor (exit 2), never a failure inside torchrun.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from configs.errors import ConfigError
from configs.schema.model import ModelConfig

KEY = "model.hf_config"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SAFETENSORS_DTYPES = ("F32", "BF16", "F16")
"""Floating-point dtypes a checkpoint may store (each rank casts to its parameter dtype)."""

# memplan's name of each per-layer Hugging Face module (the three families share them)
HF_LAYER_MODULES = {
    "input_layernorm": "attention_norm",
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
}
HF_TOP_LEVEL = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_MEMPLAN_LAYER_MODULES = {ours: theirs for theirs, ours in HF_LAYER_MODULES.items()}
_MEMPLAN_TOP_LEVEL = {ours: theirs for theirs, ours in HF_TOP_LEVEL.items()}
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_MEMPLAN_LAYER = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")
# Buffers some older exports saved; they are recomputed from the config, never loaded.
_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_HEADER_LIMIT_BYTES = 100 * 2**20  # a safetensors header is JSON; anything bigger is not one


def hf_to_memplan_name(hf_name: str) -> str | None:
    """model.layers.1.self_attn.q_proj.bias -> layers.1.attention.wq.bias; None when the name
    is not one of the model's tensors."""
    if hf_name in HF_TOP_LEVEL:
        return HF_TOP_LEVEL[hf_name]
    match = _HF_LAYER.match(hf_name)
    if match is None or match.group(2) not in HF_LAYER_MODULES:
        return None
    index, module, leaf = match.groups()
    return f"layers.{index}.{HF_LAYER_MODULES[module]}.{leaf}"


def memplan_to_hf_name(name: str) -> str:
    """layers.1.attention.wq.bias -> model.layers.1.self_attn.q_proj.bias (the inverse)."""
    if name in _MEMPLAN_TOP_LEVEL:
        return _MEMPLAN_TOP_LEVEL[name]
    match = _MEMPLAN_LAYER.match(name)
    if match is None or match.group(2) not in _MEMPLAN_LAYER_MODULES:
        raise KeyError(f"{name} has no Hugging Face name")
    index, module, leaf = match.groups()
    return f"model.layers.{index}.{_MEMPLAN_LAYER_MODULES[module]}.{leaf}"


def expected_hf_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face name -> shape of every tensor the configured model loads (lm_head only
    when the embeddings are not tied)."""
    hidden, head = cfg.hidden_size, cfg.resolved_head_dim
    q_width, kv_width = cfg.num_heads * head, cfg.num_kv_heads * head
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (cfg.vocab_size, hidden),
        "model.norm.weight": (hidden,),
    }
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, hidden)
    per_layer = {
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (q_width, hidden),
        "self_attn.k_proj.weight": (kv_width, hidden),
        "self_attn.v_proj.weight": (kv_width, hidden),
        "self_attn.o_proj.weight": (hidden, q_width),
        "mlp.gate_proj.weight": (cfg.ffn_size, hidden),
        "mlp.up_proj.weight": (cfg.ffn_size, hidden),
        "mlp.down_proj.weight": (hidden, cfg.ffn_size),
    }
    if cfg.qkv_bias:
        per_layer |= {
            "self_attn.q_proj.bias": (q_width,),
            "self_attn.k_proj.bias": (kv_width,),
            "self_attn.v_proj.bias": (kv_width,),
        }
    if cfg.out_bias:
        per_layer["self_attn.o_proj.bias"] = (hidden,)
    for layer in range(cfg.num_layers):
        for name, shape in per_layer.items():
            shapes[f"model.layers.{layer}.{name}"] = shape
    return shapes


@dataclass(frozen=True)
class TensorEntry:
    """Where one stored tensor is and what it is, as its file's header says."""

    file: Path
    dtype: str
    shape: tuple[int, ...]


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Tensor name -> entry, from the header of one .safetensors file (the tensor data is not
    read): 8 bytes of little-endian header length, then a JSON object."""
    try:
        with path.open("rb") as stream:
            prefix = stream.read(8)
            if len(prefix) < 8:
                raise ConfigError(KEY, f"{path} is not a safetensors file (shorter than 8 bytes)")
            (length,) = struct.unpack("<Q", prefix)
            if length > _HEADER_LIMIT_BYTES:
                raise ConfigError(KEY, f"{path} is not a safetensors file (header of {length} B)")
            header = json.loads(stream.read(length).decode("utf-8"))
    except OSError as exc:
        raise ConfigError(KEY, f"cannot read {path}: {exc.strerror}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(
            KEY, f"{path} is not a safetensors file (its header is not JSON)"
        ) from exc
    if not isinstance(header, dict):
        raise ConfigError(KEY, f"{path} is not a safetensors file (header is not an object)")
    entries = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(spec, dict) or "dtype" not in spec or "shape" not in spec:
            raise ConfigError(KEY, f"{path}: tensor {name} has no dtype/shape in the header")
        entries[name] = TensorEntry(path, str(spec["dtype"]), tuple(int(d) for d in spec["shape"]))
    return entries


def weight_files(directory: Path) -> list[Path]:
    """The .safetensors files of a model directory: those model.safetensors.index.json lists
    (each must exist), else model.safetensors, else every *.safetensors; ConfigError if none."""
    index = directory / INDEX_FILE
    if index.is_file():
        from configs.checks import read_json_object

        weight_map = read_json_object(index, KEY, kind="a safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConfigError(KEY, f"{index} has no weight_map object")
        files = [directory / str(name) for name in sorted(set(weight_map.values()))]
        for path in files:
            if not path.is_file():
                raise ConfigError(KEY, f"{path} is listed in {index} but missing")
        return files
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ConfigError(
            KEY, f"{directory} holds no *.safetensors weights (model.init=hf loads them)"
        )
    return files


def stored_tensors(directory: Path) -> dict[str, TensorEntry]:
    """Every tensor of the model directory, by Hugging Face name, with its file; ConfigError
    when two files hold one name or the index names a file that does not hold the tensor."""
    entries: dict[str, TensorEntry] = {}
    for path in weight_files(directory):
        for name, entry in read_safetensors_header(path).items():
            if name in entries:
                raise ConfigError(KEY, f"tensor {name} is in both {entries[name].file} and {path}")
            entries[name] = entry
    index = directory / INDEX_FILE
    if index.is_file():
        from configs.checks import read_json_object

        for name, file in read_json_object(index, KEY, kind="a safetensors index")[
            "weight_map"
        ].items():
            if name not in entries or entries[name].file.name != file:
                raise ConfigError(KEY, f"{index} puts tensor {name} in {file}, which lacks it")
    return entries


def check_hf_weights(cfg: ModelConfig) -> dict[str, TensorEntry]:
    """The stored tensors the configured model loads, by Hugging Face name; ConfigError (one
    line naming the file and the tensor) for a directory without weights, a missing shard or
    tensor, a shape that is not the model's, a dtype that is not floating point, or a tensor
    that memplan's model has no place for."""
    from configs.hf import model_directory

    directory = model_directory(cfg.hf_config)
    if directory is None or not directory.is_dir():
        raise ConfigError(
            "model.init",
            "hf needs model.hf_config=DIR, a Hugging Face model directory with *.safetensors",
        )
    stored = stored_tensors(directory)
    expected = expected_hf_tensors(cfg)
    for name, shape in expected.items():
        if name not in stored:
            raise ConfigError(KEY, f"{directory} has no tensor {name} (shape {list(shape)})")
        entry = stored[name]
        if entry.shape != shape:
            raise ConfigError(
                KEY,
                f"{entry.file}: tensor {name} has shape {list(entry.shape)}, the model needs"
                f" {list(shape)}",
            )
        if entry.dtype not in SAFETENSORS_DTYPES:
            raise ConfigError(
                KEY,
                f"{entry.file}: tensor {name} is {entry.dtype}; allowed:"
                f" {', '.join(SAFETENSORS_DTYPES)}",
            )
    for name, entry in stored.items():
        tied_head = name == "lm_head.weight" and cfg.tie_embeddings
        if name not in expected and not tied_head and not _IGNORED.match(name):
            raise ConfigError(
                KEY, f"{entry.file}: tensor {name} has no place in the model memplan builds"
            )
    return {name: stored[name] for name in expected}
