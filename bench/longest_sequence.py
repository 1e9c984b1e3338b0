"""The longest sequence one device trains, per activation policy:
`python bench/longest_sequence.py [--device cuda] [--out longest.json]`.

For a llama3_2_1b-shaped model (scaled down on the CPU) and each policy of bench/common.py
(none, full, save_on_cpu, plan), a search over sequence lengths (one sequence per step):
double from --start until a length fails, then bisect to --quantum tokens. Every length the
search visits is really trained for --steps steps (forward, backward, optimizer step) and
counts as trainable when:
  - CUDA: no allocation fails (the device's real memory is the limit);
  - CPU: the measured peak (LiveBytes: model states + every storage created during the
    steps) fits in the emulated device budget (--budget-bytes), which is also what the
    planner is told the device has.
For `plan`, memplan plans each length for this device (planner.search.make_plan); a length
without a feasible plan is not trainable, and a plan the device cannot run is counted as a
failure of memplan's plan.

Prints a table (longest length per policy, its ratio to full recomputation, the peak, the
host bytes and the step time there), writes JSON with every point tried (--out), exits 0.

    .venv/bin/python bench/longest_sequence.py                    # CPU, emulated 64 MiB
    python3 bench/longest_sequence.py --device cuda --out longest.json
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    POLICIES,
    DeviceInfo,
    Measurement,
    Trainee,
    add_common_args,
    bench_config,
    describe_device,
    environment,
    environment_line,
    format_table,
    release_memory,
    resolve_device,
    seq_label,
    with_seq_len,
    write_json,
)
from configs.schema import Config
from planner.errors import NoFeasiblePlan
from planner.units import format_bytes


@dataclass
class Point:
    """One length tried under one policy."""

    seq_len: int
    trainable: bool
    why: str
    """'' when trainable; otherwise 'OOM: ...', 'peak > budget' or 'no feasible plan'."""
    peak_bytes: int | None = None
    host_bytes: int = 0
    step_seconds: float | None = None
    plan_layout: str = ""
    predicted_peak_bytes: int | None = None
    """policy plan: the plan's gpu_peak_bytes (what the planner expected the peak to be)."""


def try_length(
    trainee: Trainee, policy: str, cfg: Config, seq_len: int, info: DeviceInfo, steps: int
) -> Point:
    """Train `steps` steps of one seq_len-token sequence under `policy`; was it trainable?"""
    layout, predicted = "", None
    if policy == "plan":
        from planner.search import make_plan

        cfg = with_seq_len(cfg, seq_len)
        try:
            plan = make_plan(cfg, explain=False)
        except NoFeasiblePlan:
            return Point(seq_len, False, "no feasible plan")
        layers = plan.layers
        offloading = sum(
            1 for layer in layers if layer.offload_fraction or layer.anchor_offload_fraction
        )
        recomputing = sum(
            1 for layer in layers if layer.recompute != "none" or layer.recompute_fraction
        )
        layout = f"{offloading} layers offload, {recomputing} recompute"
        predicted = plan.memory.gpu_peak_bytes
        trainee.use_policy("plan", plan, cfg)
    elif trainee.policy != policy:
        trainee.use_policy(policy)
    result: Measurement = trainee.run(seq_len, steps)
    point = Point(
        seq_len,
        result.failure is None,
        result.failure or "",
        result.device_peak_bytes,
        result.host_bytes,
        result.median_seconds,
        layout,
        predicted,
    )
    if point.trainable and info.emulated and (point.peak_bytes or 0) > info.memory_bytes:
        point.trainable, point.why = False, f"peak {format_bytes(point.peak_bytes)} > budget"
    release_memory(info.device)
    return point


def longest(
    trainee: Trainee,
    policy: str,
    cfg: Config,
    info: DeviceInfo,
    args: argparse.Namespace,
) -> tuple[Point | None, list[Point]]:
    """Doubling from args.start, then bisection to args.quantum; every point trained."""
    tried: list[Point] = []

    def attempt(seq_len: int) -> bool:
        point = try_length(trainee, policy, cfg, seq_len, info, args.steps)
        tried.append(point)
        status = "ok" if point.trainable else point.why
        print(f"  {policy:<11} {seq_label(seq_len):>7}: {status}", flush=True)
        return point.trainable

    good, bad = 0, None
    length = args.start
    while length <= args.max_seq_len:
        if not attempt(length):
            bad = length
            break
        good, length = length, length * 2
    if bad is None:  # trainable up to the cap
        bad = min(length, args.max_seq_len + args.quantum)
    low, high = good // args.quantum, bad // args.quantum  # in quanta: low ok, high not
    while high - low > 1:
        middle = (low + high) // 2
        if attempt(middle * args.quantum):
            low = middle
        else:
            high = middle
    best = [p for p in tried if p.trainable and p.seq_len == low * args.quantum]
    return (best[0] if best else None), tried


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--model", default="llama3_2_1b")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the preset's)")
    parser.add_argument("--policy", action="append", choices=POLICIES, help="repeatable")
    parser.add_argument("--start", type=int, help="first length (GPU 8192, CPU 64)")
    parser.add_argument("--quantum", type=int, help="bisection step (GPU 1024, CPU 32)")
    parser.add_argument("--max-seq-len", type=int, help="cap (GPU 1048576, CPU 8192)")
    parser.add_argument("--steps", type=int, default=2, help="steps trained per length")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    args.start = args.start or (8192 if cuda else 64)
    args.quantum = args.quantum or (1024 if cuda else 32)
    args.max_seq_len = args.max_seq_len or (2**20 if cuda else 8192)
    info = describe_device(device, args.budget_bytes, args.peak_tflops)
    cfg = bench_config(args.model, args.layers, args.start, info, args.scale, args.override)
    env = environment(info)
    print(f"longest trainable sequence | {environment_line(env)}")
    m = cfg.model
    print(
        f"model {m.name}: {m.num_layers} layers, hidden {m.hidden_size}, heads {m.num_heads}/"
        f"{m.num_kv_heads}, ffn {m.ffn_size}, vocab {m.vocab_size}; {args.steps} steps per length"
    )
    results: dict[str, Any] = {}
    trainee = Trainee(cfg, device, args.seed)
    for policy in args.policy or POLICIES:
        best, tried = longest(trainee, policy, cfg, info, args)
        results[policy] = {
            "longest": asdict(best) if best else None,
            "tried": [asdict(p) for p in tried],
        }
    del trainee
    release_memory(device)

    full = results.get("full", {}).get("longest")
    rows = []
    for policy, found in results.items():
        best = found["longest"]
        if best is None:
            rows.append(
                [policy, "none trainable", "-", "-", "-", "-", "-", len(found["tried"]), ""]
            )
            continue
        ratio = f"{best['seq_len'] / full['seq_len']:.2f}x" if full else "-"
        rows.append(
            [
                policy,
                seq_label(best["seq_len"]),
                ratio,
                format_bytes(best["peak_bytes"]),
                format_bytes(best["predicted_peak_bytes"]),
                format_bytes(best["host_bytes"]) if best["host_bytes"] else "-",
                f"{best['step_seconds']:.3f}" if best["step_seconds"] else "-",
                len(found["tried"]),
                best["plan_layout"],
            ]
        )
    print()
    print(
        format_table(
            [
                "policy",
                "longest",
                "vs full",
                "peak",
                "plan's peak",
                "host",
                "step s",
                "tried",
                "plan",
            ],
            rows,
        )
    )
    plan = results.get("plan", {}).get("longest")
    if plan and full:
        ratio = plan["seq_len"] / full["seq_len"]
        print(f"memplan's plan / full recomputation: {ratio:.2f}x longer (target >= 1.3x)")
    write_json(args.out, {"environment": env, "model": asdict(cfg.model), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
