"""The longest sequence one device trains, per activation policy:
`python bench/longest_sequence.py [--device cuda] [--out longest.json]`.

For a llama3_2_1b-shaped model (scaled down on the CPU) and each policy of
framework/measure/trainee.py (none, full, save_on_cpu, plan), a search over sequence lengths
(one sequence per step, framework/measure/sweeps.py): double from --start until a length
fails, then bisect to --quantum tokens. Every length the search visits is really trained for
--steps steps (the runtime's train step) and counts as trainable when:
  - CUDA: no allocation fails (the device's real memory is the limit);
  - CPU: the measured peak (LiveBytes: model states + every storage created during the
    steps) fits in the emulated device budget (--budget-bytes), which is also what the
    planner is told the device has.
For `plan`, memplan plans each length for this device; a length without a feasible plan is
not trainable, and a plan the device cannot run is counted as a failure of memplan's plan.

Prints a table (longest length per policy, its ratio to full recomputation, the peak, the
host bytes and the step time there), writes JSON with every point tried (--out), exits 0.

    .venv/bin/python bench/longest_sequence.py                    # CPU, emulated 64 MiB
    python3 bench/longest_sequence.py --device cuda --out longest.json
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from typing import Any

from configs.schema import Config
from framework.measure import bench, sweeps, tables
from framework.measure.device import DeviceInfo, environment, environment_line
from framework.measure.sweeps import Point
from framework.measure.trainee import POLICIES, Trainee, release_memory
from launch.compose import compose_config
from planner.units import format_bytes

HEADERS = ("policy", "longest", "vs full", "peak", "plan's peak", "host", "step s", "tried", "plan")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.add_common_args(parser)
    bench.add_sweep_args(parser)
    parser.add_argument("--start", type=int, help="first length (GPU 8192, CPU 64)")
    parser.add_argument("--quantum", type=int, help="bisection step (GPU 1024, CPU 32)")
    parser.add_argument("--max-seq-len", type=int, help="cap (GPU 1048576, CPU 8192)")
    parser.add_argument("--steps", type=int, default=2, help="steps trained per length")
    args = parser.parse_args(argv)
    args.info = bench.device_from_args(parser, args)
    cuda = args.info.device.type == "cuda"
    args.start = args.start or (8192 if cuda else 64)
    args.quantum = args.quantum or (1024 if cuda else 32)
    args.max_seq_len = args.max_seq_len or (2**20 if cuda else 8192)
    return args


def table_row(policy: str, found: dict[str, Any], full: dict[str, Any] | None) -> list[Any]:
    best = found["longest"]
    if best is None:
        return [policy, "none trainable", "-", "-", "-", "-", "-", len(found["tried"]), ""]
    return [
        policy,
        tables.seq_label(best["seq_len"]),
        f"{best['seq_len'] / full['seq_len']:.2f}x" if full else "-",
        format_bytes(best["peak_bytes"]),
        format_bytes(best["predicted_peak_bytes"]),
        format_bytes(best["host_bytes"]) if best["host_bytes"] else "-",
        f"{best['step_seconds']:.3f}" if best["step_seconds"] else "-",
        len(found["tried"]),
        best["plan_layout"],
    ]


def search(
    trainee: Trainee, policy: str, cfg: Config, info: DeviceInfo, args: argparse.Namespace
) -> dict[str, Any]:
    """The longest trainable length under `policy` and every point tried, as JSON."""
    tried: list[Point] = []

    def attempt(seq_len: int) -> bool:
        point = sweeps.try_length(trainee, policy, cfg, seq_len, info, args.steps)
        tried.append(point)
        print(f"  {policy:<11} {tables.seq_label(seq_len):>7}: {point.why or 'ok'}", flush=True)
        return point.trainable

    best = sweeps.longest(attempt, args.start, args.quantum, args.max_seq_len)
    found = [p for p in tried if p.trainable and p.seq_len == best]
    return {"longest": asdict(found[0]) if found else None, "tried": [asdict(p) for p in tried]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = args.info
    overrides = bench.bench_overrides(args.model, args.layers, args.start, info, args.override)
    cfg = bench.scaled(compose_config(overrides), args.scale, info.device)
    env = environment(info)
    print(f"longest trainable sequence | {environment_line(env)}")
    print(f"{tables.model_line(cfg.model)}; {args.steps} steps per length")
    results: dict[str, Any] = {}
    trainee = Trainee(cfg, info.device, args.seed)
    for policy in args.policy or POLICIES:
        results[policy] = search(trainee, policy, cfg, info, args)
    del trainee
    release_memory(info.device)

    full = results.get("full", {}).get("longest")
    rows = [table_row(policy, found, full) for policy, found in results.items()]
    print()
    print(tables.format_table(HEADERS, rows))
    plan = results.get("plan", {}).get("longest")
    if plan and full:
        ratio = plan["seq_len"] / full["seq_len"]
        print(f"memplan's plan / full recomputation: {ratio:.2f}x longer (target >= 1.3x)")
    bench.write_json(args.out, {"environment": env, "model": asdict(cfg.model), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
