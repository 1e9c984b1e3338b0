"""Schema of the `export` node: `memplan export`."""

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ExportConfig:
    """`memplan export`: a plan as another tool's config file."""

    format: Literal["deepspeed", "accelerate"] = "deepspeed"
    """deepspeed: a DeepSpeed config JSON; accelerate: an `accelerate launch --config_file`
    YAML (FSDP2, or DeepSpeed with the JSON written beside it)."""
    out: str | None = None
    """The file to write (required)."""
    accelerate_backend: Literal["auto", "fsdp", "deepspeed"] = "auto"
    """export.format=accelerate only: fsdp (FSDP2, ZeRO-2/3), deepspeed (a DeepSpeed JSON
    beside the YAML, any ZeRO stage); auto: fsdp for an fsdp2 plan at ZeRO-2/3, else deepspeed
    (which has ZeRO-0/1)."""
