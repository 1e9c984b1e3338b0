"""How long a checkpoint blocks the training loop: memplan's asynchronous checkpoint (lazy host
snapshot + background DCP write and commit) vs a synchronous torch.save of the same state,
measured side by side in one process on one model.

    .venv/bin/python bench/checkpoint.py                       # ~1.4 GiB state on CPU
    .venv/bin/python bench/checkpoint.py --model llama3_2_1b --device cuda --seq-len 2048

The run is a sequence of windows of `--every` steps, in rounds; each round has one window of
each kind, in a rotated order so that drift in machine load falls on every kind alike:
  baseline     no checkpoint
  async        memplan's Checkpointer (checkpoint.async_mode=thread) saves at the window's
               start; the window ends when the checkpoint is committed (so its background
               work is charged to the window)
  torch.save   torch.save(state_dict) + fsync at the window's start
Blocked = time the training thread spends in checkpoint calls (save() and the pre-update wait;
torch.save + fsync). Wall cost = median window time minus the median baseline window (medians:
a shared machine's load bursts hit single windows). Amortised =
per checkpoint / (`--every` x baseline step time). One async save before the rounds allocates
the reused host buffers; its blocking time is printed apart. Prints a table; exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from configs.schema import CheckpointConfig, ModelConfig, TrainConfig
from framework.components.checkpoint import Checkpointer
from framework.components.checkpoint.staging import state_bytes
from framework.components.model import build_model, count_parameters, materialize
from framework.runtime import LocalRuntime
from planner.units import GIB


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a configs/model preset (default: the dimensions below)")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=1, help="sequences per step")
    p.add_argument("--every", type=int, default=10, help="steps between checkpoints")
    p.add_argument("--rounds", type=int, default=3, help="windows of each kind")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dir", help="where checkpoints go (default: a temporary directory)")
    p.add_argument("--out", help="also write the results as JSON here")
    return p.parse_args()


def model_config(args: argparse.Namespace) -> ModelConfig:
    if args.model:
        from launch.compose import compose_config

        return compose_config([f"model={args.model}"]).model
    return ModelConfig(
        name="bench",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        ffn_size=args.ffn,
        max_seq_len=max(args.seq_len, 256),
    )


class Bench:
    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args, self.device = args, device
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        cfg = model_config(args)
        train_cfg = TrainConfig(
            seq_len=args.seq_len, global_batch_size=args.batch, warmup_steps=2, steps=10**6
        )
        model = materialize(build_model(cfg), device, seed=0)
        self.num_params = count_parameters(model)
        self.runtime = LocalRuntime(model, train_cfg, args.batch, device, dtype)
        generator = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(
            0, cfg.vocab_size, (args.batch, args.seq_len + 1), generator=generator
        )
        self.step_count = 0

    def step(self) -> None:
        self.runtime.train_step(self.tokens[:, :-1], self.tokens[:, 1:])
        self.step_count += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def steps(self) -> None:
        for _ in range(self.args.every):
            self.step()

    def state(self) -> dict:
        return {k: v.state_dict() for k, v in self.runtime.stateful_parts().items()}


@dataclass
class Window:
    kind: str
    wall: float
    blocked: float = 0.0
    detail: float = 0.0
    """async: background persist seconds; torch.save: its fsync seconds."""


def run(args: argparse.Namespace, device: torch.device, root: Path) -> tuple[Bench, list, float]:
    bench = Bench(args, device)
    for _ in range(2):  # optimizer state exists after the first step
        bench.step()
    cfg = CheckpointConfig(every=args.every, keep=1, async_mode="thread")
    ckpt = Checkpointer(cfg, root / "async", bench.runtime.stateful_parts(), device, {})
    bench.runtime.pre_update_hooks.append(ckpt.before_update)
    ckpt.save(bench.step_count, {})  # allocates the reused host buffers
    bench.step()
    ckpt.finish()
    first_blocked = ckpt.stats[-1].blocked_seconds
    save_path = root / "torch_save.pt"

    def baseline() -> Window:
        start = time.perf_counter()
        bench.steps()
        return Window("baseline", time.perf_counter() - start)

    def asynchronous() -> Window:
        start = time.perf_counter()
        ckpt.save(bench.step_count, {})
        bench.steps()
        ckpt.finish()
        stats = ckpt.stats[-1]
        if not stats.committed:
            raise SystemExit(f"the async checkpoint at step {stats.step} failed (see the log)")
        return Window("async", time.perf_counter() - start, stats.blocked_seconds,
                      stats.persist_seconds or 0.0)  # fmt: skip

    def torch_save() -> Window:
        start = time.perf_counter()
        torch.save(bench.state(), save_path)
        saved = time.perf_counter()
        with open(save_path, "rb+") as handle:
            os.fsync(handle.fileno())
        blocked = time.perf_counter() - start
        bench.steps()
        return Window("torch.save", time.perf_counter() - start, blocked, blocked - (saved - start))

    kinds = [baseline, asynchronous, torch_save]
    windows = []
    for round_index in range(args.rounds):
        shift = round_index % len(kinds)
        for kind in kinds[shift:] + kinds[:shift]:
            windows.append(kind())
    ckpt.close()
    bench.runtime.pre_update_hooks.remove(ckpt.before_update)
    return bench, windows, first_blocked


def main() -> int:
    args = parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    root = Path(args.dir or tempfile.mkdtemp(prefix="memplan-bench-ckpt-"))
    root.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    try:
        bench, windows, first_blocked = run(args, device, root)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)

    def of(kind: str) -> list[Window]:
        return [w for w in windows if w.kind == kind]

    base = statistics.median(w.wall for w in of("baseline"))  # robust to load bursts
    step_s = base / args.every
    gib = state_bytes(bench.state()) / GIB
    print(
        f"\nmodel {bench.num_params / 1e6:.0f}M params, state {gib:.2f} GiB (params + AdamW) on"
        f" {device.type} | torch {torch.__version__} | {os.cpu_count()} CPUs"
        f" | {args.batch} x {args.seq_len} tokens/step | checkpoint every {args.every} steps"
        f" | {args.rounds} rounds"
    )
    walls = ", ".join(f"{w.wall:.1f}" for w in of("baseline"))
    print(
        f"baseline step {step_s:.3f} s (windows of {args.every} steps: {walls} s) | load average"
        f" {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after"
    )
    print(f"first async save (allocates the host buffers): blocked {first_blocked:.4f} s")
    header = (
        f"\n{'method':<12} {'blocked/ckpt':>13} {'max':>8} {'amortised':>10} "
        f"{'wall cost/ckpt':>15} {'amortised':>10}  note"
    )
    print(header)
    print(f"{'':<12} {'(s)':>13} {'(s)':>8} {'(blocked)':>10} {'(s)':>15} {'(wall)':>10}")
    window = args.every * step_s
    summary = {}
    for kind, note in [("async", "s persisting in background"), ("torch.save", "s of it fsync")]:
        rows = of(kind)
        blocked = statistics.mean(w.blocked for w in rows)
        cost = statistics.median(w.wall for w in rows) - base
        summary[kind] = (blocked, cost)
        print(
            f"{kind:<12} {blocked:>13.4f} {max(w.blocked for w in rows):>8.4f} "
            f"{blocked / window:>9.2%} {cost:>15.2f} {cost / window:>9.2%}  "
            f"{statistics.mean(w.detail for w in rows):.2f} {note}"
        )
    (async_blocked, async_cost), (save_blocked, _) = summary["async"], summary["torch.save"]
    print(
        f"\nasync blocks {save_blocked / async_blocked:.0f}x less than torch.save + fsync per "
        f"checkpoint (target >= 10x); amortised per step at every {args.every}: "
        f"{async_blocked / window:.2%} blocked, {async_cost / window:.2%} wall (target < 3%)"
    )
    if args.out:
        results = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "argv": sys.argv,
            "params": bench.num_params,
            "state_gib": gib,
            "baseline_step_seconds": step_s,
            "every": args.every,
            "rounds": args.rounds,
            "first_async_blocked_seconds": first_blocked,
            "blocked_seconds_per_checkpoint": {k: v[0] for k, v in summary.items()},
            "wall_cost_seconds_per_checkpoint": {k: v[1] for k, v in summary.items()},
            "windows": [dataclasses.asdict(w) for w in windows],
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
