"""Schema of the `export` node: `memplan export`."""

from dataclasses import dataclass
from typing import Literal

from configs.checks import check_bounds


@dataclass(frozen=True)
class ExportConfig:
    """`memplan export`: a plan as another tool's config file, or a checkpoint as a Hugging
    Face model directory."""

    format: Literal["auto", "hf", "deepspeed", "accelerate"] = "auto"
    """hf: the model of a committed checkpoint (export.checkpoint) as a Hugging Face directory
    (config.json, safetensors, tokenizer); deepspeed: the plan as a DeepSpeed config JSON;
    accelerate: an `accelerate launch --config_file` YAML (FSDP2, or DeepSpeed with the JSON
    written beside it); auto: hf when export.checkpoint is given, else deepspeed."""
    out: str | None = None
    """The file to write (the directory, for hf: absent or empty; required)."""
    checkpoint: str | None = None
    """hf: a committed checkpoint directory (step_NNNNNNNNN), or a checkpoint.dir whose newest
    committed checkpoint is exported; any layout."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """hf: the tensors' dtype (fp32: the checkpoint's master weights exactly)."""
    max_shard_gib: float = 5.0
    """hf: the largest safetensors file; bigger models are split with an index, as
    transformers' save_pretrained does."""
    accelerate_backend: Literal["auto", "fsdp", "deepspeed"] = "auto"
    """export.format=accelerate only: fsdp (FSDP2, ZeRO-2/3), deepspeed (a DeepSpeed JSON
    beside the YAML, any ZeRO stage); auto: fsdp for an fsdp2 plan at ZeRO-2/3, else deepspeed
    (which has ZeRO-0/1)."""

    def __post_init__(self) -> None:
        check_bounds(self, "export", ("max_shard_gib",), above=0)

    @property
    def resolved_format(self) -> str:
        """export.format with auto resolved."""
        if self.format != "auto":
            return self.format
        return "hf" if self.checkpoint else "deepspeed"
