"""How long a checkpoint blocks the training loop: memplan's asynchronous checkpoint (lazy host
snapshot + background DCP write and commit) vs a synchronous torch.save of the same state,
measured side by side in one process on one model.

    .venv/bin/python bench/checkpoint.py                       # ~1.5 GB state on CPU
    .venv/bin/python bench/checkpoint.py --model llama3_2_1b --device cuda --seq-len 2048

Phases, each `--every` x `--checkpoints` steps, checkpoints after steps every, 2*every, ...
(so each is followed by `--every` steps to amortise over):
  baseline   no checkpoints (run before and after the others; the mean is the reference)
  async      memplan's Checkpointer (checkpoint.async_mode=thread)
  torch.save torch.save(state_dict) + fsync in the loop
Blocked = time the training thread spends in checkpoint calls (save, the pre-update wait;
torch.save + fsync). Slowdown = phase wall time vs baseline (includes the background work
competing for the CPU). Prints a table; exits 0.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs.schema import CheckpointConfig, ModelConfig, TrainConfig  # noqa: E402
from framework.checkpoint import Checkpointer  # noqa: E402
from framework.checkpoint.staging import state_bytes  # noqa: E402
from framework.model import build_model, count_parameters, materialize  # noqa: E402
from framework.runtime import LocalRuntime  # noqa: E402


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
    p.add_argument("--batch", type=int, default=2, help="sequences per step")
    p.add_argument("--every", type=int, default=10, help="steps between checkpoints")
    p.add_argument("--checkpoints", type=int, default=2, help="checkpoints per phase")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dir", help="where checkpoints go (default: a temporary directory)")
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
    def __init__(self, args: argparse.Namespace, device: torch.device, root: Path) -> None:
        self.args, self.device, self.root = args, device, root
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
        self.steps = args.every * args.checkpoints

    def step(self) -> None:
        self.runtime.train_step(self.tokens[:, :-1], self.tokens[:, 1:])
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def state_gib(self) -> float:
        parts = self.runtime.stateful_parts()
        return state_bytes({k: v.state_dict() for k, v in parts.items()}) / 2**30

    def baseline(self) -> float:
        start = time.perf_counter()
        for _ in range(self.steps):
            self.step()
        return time.perf_counter() - start

    def run_async(self) -> tuple[float, list[float], list[float], float]:
        """Wall time, blocked seconds and background persist seconds per checkpoint."""
        cfg = CheckpointConfig(every=self.args.every, keep=1, async_mode="thread")
        parts = self.runtime.stateful_parts()
        ckpt = Checkpointer(cfg, self.root / "async", parts, self.device, {})
        self.runtime.pre_update_hooks.append(ckpt.before_update)
        start = time.perf_counter()
        for step in range(1, self.steps + 1):
            self.step()
            if step % self.args.every == 0 and step < self.steps:
                ckpt.save(step, {})
        wall = time.perf_counter() - start
        finish = time.perf_counter()
        ckpt.finish()
        tail = time.perf_counter() - finish
        ckpt.close()
        self.runtime.pre_update_hooks.remove(ckpt.before_update)
        failed = [s.step for s in ckpt.stats if not s.committed]
        if failed:
            raise SystemExit(f"async checkpoints at steps {failed} failed (see the log)")
        blocked = [s.blocked_seconds for s in ckpt.stats]
        persist = [s.persist_seconds or 0.0 for s in ckpt.stats]
        return wall, blocked, persist, tail

    def run_torch_save(self) -> tuple[float, list[float], list[float]]:
        """Wall time and blocked seconds per checkpoint (torch.save, then its fsync)."""
        path = self.root / "torch_save.pt"
        saves, fsyncs = [], []
        start = time.perf_counter()
        for step in range(1, self.steps + 1):
            self.step()
            if step % self.args.every == 0 and step < self.steps:
                t0 = time.perf_counter()
                parts = self.runtime.stateful_parts()
                torch.save({k: v.state_dict() for k, v in parts.items()}, path)
                t1 = time.perf_counter()
                with open(path, "rb+") as handle:
                    os.fsync(handle.fileno())
                fsyncs.append(time.perf_counter() - t1)
                saves.append(t1 - t0)
        wall = time.perf_counter() - start
        path.unlink()
        return wall, saves, fsyncs


def main() -> int:
    args = parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    root = Path(args.dir or tempfile.mkdtemp(prefix="memplan-bench-ckpt-"))
    root.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    bench = Bench(args, device, root)
    try:
        for _ in range(2):  # optimizer state exists after the first step
            bench.step()
        base_before = bench.baseline()
        async_wall, blocked, persist, tail = bench.run_async()
        save_wall, saves, fsyncs = bench.run_torch_save()
        base_after = bench.baseline()
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    base = (base_before + base_after) / 2
    step_s = base / bench.steps
    ckpts = args.checkpoints - 1  # each followed by `every` steps
    gib = bench.state_gib()

    print(
        f"\nmodel {bench.num_params / 1e6:.0f}M params, state {gib:.2f} GiB (params + AdamW) on"
        f" {device.type} | torch {torch.__version__} | {os.cpu_count()} CPUs"
        f" | {args.batch} x {args.seq_len} tokens/step | checkpoint every {args.every} steps"
    )
    print(
        f"baseline step {step_s:.3f} s (phase walls {base_before:.1f} s before, "
        f"{base_after:.1f} s after) | load average before {load_before[0]:.2f}, "
        f"after {os.getloadavg()[0]:.2f}"
    )
    save_blocked = [s + f for s, f in zip(saves, fsyncs, strict=True)]
    rows = [
        (
            "async (memplan)",
            statistics.mean(blocked),
            max(blocked),
            (async_wall - base) / ckpts,
            f"{statistics.mean(persist):.2f} s in background",
        ),
        (
            "torch.save",
            statistics.mean(saves),
            max(saves),
            (save_wall - base) / ckpts,
            f"+ fsync {statistics.mean(fsyncs):.2f} s",
        ),
        (
            "torch.save + fsync",
            statistics.mean(save_blocked),
            max(save_blocked),
            (save_wall - base) / ckpts,
            "",
        ),
    ]
    window = args.every * step_s
    print(
        f"\n{'method':<20} {'blocked/ckpt':>13} {'max':>8} {'amortised':>10} "
        f"{'wall cost/ckpt':>15} {'amortised':>10}  note"
    )
    print(f"{'':<20} {'(s)':>13} {'(s)':>8} {'(blocked)':>10} {'(s)':>15} {'(wall)':>10}")
    for name, mean, worst, wall_cost, note in rows:
        print(
            f"{name:<20} {mean:>13.4f} {worst:>8.4f} {mean / window:>9.2%} "
            f"{wall_cost:>15.2f} {wall_cost / window:>9.2%}  {note}"
        )
    ratio = statistics.mean(saves) / statistics.mean(blocked)
    print(
        f"\nasync blocks {ratio:.0f}x less than torch.save per checkpoint "
        f"(target >= 10x); amortised per step at every {args.every}: "
        f"{statistics.mean(blocked) / window:.2%} blocked, "
        f"{(async_wall - base) / ckpts / window:.2%} wall (target < 3%)"
        f" | last commit finished {tail:.2f} s after the loop"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
