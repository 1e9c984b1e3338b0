"""A committed memplan checkpoint (any layout) as a Hugging Face model directory: config.json,
safetensors shards with their index (one model.safetensors when everything fits one shard),
and the tokenizer files of the model directory the run was configured from, if known.

The checkpoint is read with torch.distributed.checkpoint in this one process (DCP
reassembles any sharding), one output shard at a time: memory holds at most one shard of
tensors, never the whole model nor any optimizer state. The output is written to a
temporary directory beside export.out and renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from configs.errors import ConfigError
from configs.hf import model_directory, read_model_type
from configs.hf_weights import INDEX_FILE, SINGLE_FILE, memplan_to_hf_name
from configs.hf_write import export_model_type, hf_config_json
from configs.schema import ModelConfig
from configs.structured import to_typed
from framework.components.checkpoint.storage import (
    CorruptCheckpoint,
    list_committed,
    read_commit,
    verify_files,
)

KEY = "export.checkpoint"
MODEL_PREFIX = "model."
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",  # bos/eos ids: generate() stops at EOS
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_HF_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

# DCP warns on every single-process load; one process is what an export is.
warnings.filterwarnings(
    "ignore", message="torch.distributed is disabled, unavailable or uninitialized"
)


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote."""

    out: Path
    step: int
    files: list[str]
    num_tensors: int
    total_bytes: int
    model_type: str


def committed_step_dir(path: str) -> Path:
    """The checkpoint to export: `path` itself when it is a committed step directory, else the
    newest committed one under it; ConfigError (export.checkpoint) otherwise or when its files
    do not match their commit record."""
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(KEY, f"no such checkpoint directory: {path}")
    if (root / "commit.json").is_file():
        directory = root
    else:
        committed = list_committed(root)
        if not committed:
            raise ConfigError(
                KEY, f"{path} holds no committed checkpoint (step_NNNNNNNNN/ with a commit.json)"
            )
        directory = committed[0][1]
    try:
        record = read_commit(directory)
    except CorruptCheckpoint as exc:
        raise ConfigError(KEY, f"{directory}: {exc}") from exc
    problems = verify_files(directory, record, record["files"])
    if problems:
        raise ConfigError(KEY, f"{directory} is damaged: {problems[0]}")
    return directory


def checkpoint_model_config(directory: Path) -> tuple[ModelConfig, str | None]:
    """The ModelConfig the checkpoint was trained with (its config.json) and the model_type of
    the Hugging Face directory it was configured from, when that is still readable."""
    try:
        raw = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(KEY, f"{directory}/config.json is unreadable: {exc}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise ConfigError(KEY, f"{directory}/config.json has no model node (not memplan's?)")
    cfg = to_typed(raw["model"], ModelConfig, prefix="model")
    source_type = None
    if cfg.hf_config and Path(cfg.hf_config).exists():
        try:
            source_type = read_model_type(cfg.hf_config)
        except ConfigError:
            source_type = None  # the source moved or changed: choose by the bias layout
    return cfg, source_type


def _shards(
    names: list[tuple[str, str, torch.Size]], itemsize: int, max_shard_bytes: int
) -> list[list[tuple[str, str, torch.Size]]]:
    """Consecutive groups of (fqn, hf name, shape) of at most max_shard_bytes each (a tensor
    larger than that is a shard of its own), as transformers' save_pretrained cuts them."""
    shards: list[list[tuple[str, str, torch.Size]]] = [[]]
    size = 0
    for item in names:
        tensor_bytes = item[2].numel() * itemsize
        if shards[-1] and size + tensor_bytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += tensor_bytes
    return shards


def _hf_order(fqn: str) -> tuple[int, int, str]:
    """Embedding first, then layers by index, then the final norm and output."""
    if fqn.startswith("layers."):
        return (1, int(fqn.split(".")[1]), fqn)
    return (0 if fqn.startswith("tok_embeddings") else 2, 0, fqn)


def export_hf(
    checkpoint: str, out: str, dtype: str = "fp32", max_shard_bytes: int = 5 * 2**30
) -> ExportResult:
    """Write the model of the committed checkpoint `checkpoint` as a Hugging Face directory
    at `out` (which must not exist or be empty), tensors in `dtype`."""
    from safetensors.torch import save_file

    directory = committed_step_dir(checkpoint)
    cfg, source_type = checkpoint_model_config(directory)
    model_type = export_model_type(cfg, source_type)
    metadata = FileSystemReader(str(directory)).read_metadata()
    tensors = []
    for key, entry in metadata.state_dict_metadata.items():
        if key.startswith(MODEL_PREFIX) and isinstance(entry, TensorStorageMetadata):
            fqn = key[len(MODEL_PREFIX) :]
            if fqn == "output.weight" and cfg.tie_embeddings:
                continue  # a tied copy, if ever stored, is the embedding
            try:
                hf_name = memplan_to_hf_name(fqn)
            except KeyError as exc:
                raise ConfigError(
                    KEY,
                    f"{directory}: tensor {fqn} has no Hugging Face name (not memplan's model?)",
                ) from exc
            tensors.append((fqn, hf_name, entry.size, entry.properties.dtype))
    tensors.sort(key=lambda item: _hf_order(item[0]))
    target = DTYPES[dtype]
    shards = _shards([t[:3] for t in tensors], target.itemsize, max_shard_bytes)
    stored_dtype = {fqn: stored for fqn, _, _, stored in tensors}

    final = Path(out).absolute()
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        weight_map, names, total = {}, [], 0
        for number, shard in enumerate(shards, start=1):
            name = (
                SINGLE_FILE
                if len(shards) == 1
                else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            )
            state = {fqn: torch.empty(shape, dtype=stored_dtype[fqn]) for fqn, _, shape in shard}
            try:
                dcp.load({"model": state}, checkpoint_id=str(directory), no_dist=True)
            except Exception as exc:  # DCP wraps every reader failure in its own exception
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ConfigError(KEY, f"cannot read {directory}: {first}") from exc
            out_tensors = {hf: state[fqn].to(target).contiguous() for fqn, hf, _ in shard}
            save_file(out_tensors, str(tmp / name), metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in out_tensors.values())
            weight_map.update({hf: name for hf in out_tensors})
            names.append(name)
            del state, out_tensors
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
            names.append(INDEX_FILE)
        config = hf_config_json(cfg, model_type, _HF_DTYPE_NAMES[dtype])
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        names.append("config.json")
        source = model_directory(cfg.hf_config)
        for tokenizer_file in TOKENIZER_FILES:
            if source is not None and (source / tokenizer_file).is_file():
                shutil.copy2(source / tokenizer_file, tmp / tokenizer_file)
                names.append(tokenizer_file)
        try:  # onto an absent or empty directory (checked by the caller): one rename
            os.replace(tmp, final)
        except OSError as exc:
            raise ConfigError("export.out", f"cannot move the export into {final}: {exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    step = int(read_commit(directory)["step"])
    return ExportResult(final, step, names, len(weight_map), total, model_type)
