"""What the benchmark entry points (bench/estimator_accuracy.py, longest_sequence.py,
throughput.py) share: their common arguments, the config overrides of one sequence on this
device, the model scale, MFU, and the JSON file.

The scripts compose the config themselves (launch.compose.compose_config: Hydra runs in the
launcher layer only), from `bench_overrides(...)`, then apply `scaled(cfg, scale, device)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from configs.schema import Config
from framework.measure.device import DeviceInfo, cluster_overrides, describe_device, resolve_device
from framework.measure.setup import scale_down
from framework.measure.trainee import POLICIES
from planner.flops import training_flops_per_token


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """--device, --scale, --budget-bytes, --peak-tflops, --override, --seed, --out."""
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--scale",
        default="auto",
        choices=["auto", "full", "small"],
        help="auto: the model's real dims on CUDA, scaled down "
        "(framework.measure.setup.scale_down) on the CPU",
    )
    parser.add_argument(
        "--budget-bytes",
        type=int,
        default=64 * 2**20,
        help="CPU only: the emulated device memory (the planner plans for it; a length is "
        "trainable when the measured peak fits in it)",
    )
    parser.add_argument(
        "--peak-tflops", type=float, help="dense peak of the device (default: from its name)"
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra memplan config override (repeatable), e.g. model.hidden_size=64",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the results as JSON here")


def add_sweep_args(parser: argparse.ArgumentParser) -> None:
    """--model, --layers and --policy of the policy sweeps (longest_sequence, throughput)."""
    parser.add_argument("--model", default="llama3_2_1b")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the preset's)")
    parser.add_argument("--policy", action="append", choices=POLICIES, help="repeatable")


def device_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> DeviceInfo:
    """The device of --device, described for the planner; bad input exits 2 (parser.error)."""
    try:
        return describe_device(resolve_device(args.device), args.budget_bytes, args.peak_tflops)
    except ValueError as exc:
        parser.error(str(exc))


def bench_overrides(
    model: str, layers: int | None, seq_len: int, info: DeviceInfo, extra: Sequence[str] = ()
) -> list[str]:
    """The overrides a user would compose for one sequence of seq_len tokens on this device."""
    overrides = [
        f"model={model}",
        *cluster_overrides(info),
        f"train.seq_len={seq_len}",
        "train.global_batch_size=1",
        "train.micro_batch_size=1",
        "logging.wandb=false",
    ]
    if layers:
        overrides.append(f"model.num_layers={layers}")
    return [*overrides, *extra]


def resolve_scale(scale: str, device: torch.device) -> str:
    """auto: the real dims on CUDA, framework.measure.setup.scale_down on the CPU."""
    if scale == "auto":
        return "full" if device.type == "cuda" else "small"
    return scale


def scaled(cfg: Config, scale: str, device: torch.device) -> Config:
    """cfg, with its model scaled down (framework.measure.setup.scale_down) when `scale`
    resolves to small on `device`."""
    if resolve_scale(scale, device) == "small":
        return dataclasses.replace(cfg, model=scale_down(cfg.model))
    return cfg


def with_seq_len(cfg: Config, seq_len: int) -> Config:
    """The same config for another sequence length (no re-composition)."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seq_len=seq_len))


def mfu(cfg: Config, seq_len: int, tokens_per_second: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation with planner/flops.py's formula (recomputation not counted)."""
    flops = training_flops_per_token(cfg.model, seq_len) * tokens_per_second
    return flops / (peak_tflops * 1e12)


def write_json(path: str | None, data: dict[str, Any]) -> None:
    """Write `data` as JSON to `path` (parents created); nothing when path is None."""
    if not path:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(f"wrote {target}")
