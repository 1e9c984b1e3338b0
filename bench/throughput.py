"""Tokens/s and MFU per activation policy and sequence length:
`python bench/throughput.py [--device cuda] [--longest longest.json] [--out tput.json]`.

For a llama3_2_1b-shaped model (scaled down on the CPU), each policy of
framework/measure/trainee.py (none, full, save_on_cpu, plan) at each length: one warm-up
step, then --steps timed steps of one sequence (the runtime's train step: forward, chunked
cross-entropy, backward, clipping, optimizer); the median step gives tokens/s, and MFU uses
planner/flops.py's formula (6 x params + attention FLOPs per token; recomputation is not
counted as useful work) against the device's dense peak (framework/measure/sweeps.py).

Lengths: --lengths (default GPU 8192, 32768; CPU 128, 512), plus, with --longest (the JSON
of bench/longest_sequence.py), the longest length every policy trained and full
recomputation's longest length (where the issue compares memplan's plan with it). A policy
that cannot run a length (OOM, no feasible plan) shows why instead of a number. On the CPU
the memory budget is not enforced here (bench/longest_sequence.py checks it).

    .venv/bin/python bench/throughput.py
    python3 bench/throughput.py --device cuda --longest longest.json --out throughput.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from framework.measure import bench, sweeps, tables
from framework.measure.device import environment, environment_line
from framework.measure.trainee import POLICIES, Trainee, release_memory
from launch.compose import compose_config
from planner.units import format_bytes


def lengths_from_longest(path: str) -> dict[str, int]:
    """'longest common' and 'full's longest' lengths from bench/longest_sequence.py's JSON."""
    results = json.loads(Path(path).read_text())["results"]
    found = {p: r["longest"]["seq_len"] for p, r in results.items() if r["longest"]}
    named = {}
    if found:
        named["longest common"] = min(found.values())
    if "full" in found:
        named["full's longest"] = found["full"]
    return named


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.add_common_args(parser)
    bench.add_sweep_args(parser)
    parser.add_argument("--lengths", help="comma-separated (default GPU 8192,32768; CPU 128,512)")
    parser.add_argument("--longest", help="bench/longest_sequence.py's JSON: adds its lengths")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
    args = parser.parse_args(argv)
    args.info = bench.device_from_args(parser, args)
    default = "8192,32768" if args.info.device.type == "cuda" else "128,512"
    names: dict[int, list[str]] = {n: [] for n in map(int, (args.lengths or default).split(","))}
    if args.longest:
        for name, n in lengths_from_longest(args.longest).items():
            names.setdefault(n, []).append(name)
    args.named_lengths = {
        tables.seq_label(n) + (f" ({', '.join(extra)})" if extra else ""): n
        for n, extra in sorted(names.items())
    }
    return args


def table_row(row: dict[str, Any], cuda: bool) -> list[Any]:
    if "failure" in row:
        return [row["length"], row["policy"], row["failure"][:40], "-", "-", "-"]
    return [
        row["length"],
        row["policy"],
        f"{row['tokens_per_second']:,.0f}",
        f"{100 * row['mfu']:.1f}%",
        f"{row['step_seconds']:.3f}",
        format_bytes(row["peak_bytes"]) if cuda else "-",
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info, lengths = args.info, args.named_lengths
    seq = min(lengths.values())
    overrides = bench.bench_overrides(args.model, args.layers, seq, info, args.override)
    cfg = bench.scaled(compose_config(overrides), args.scale, info.device)
    env = environment(info)
    print(f"throughput | {environment_line(env)}")
    print(
        f"{tables.model_line(cfg.model)}; peak {info.peak_tflops} TFLOP/s; median of "
        f"{args.steps} steps"
    )
    trainee = Trainee(cfg, info.device, args.seed)
    rows: list[dict[str, Any]] = []
    for label, seq_len in lengths.items():
        for policy in args.policy or POLICIES:
            row = sweeps.throughput_row(trainee, policy, cfg, seq_len, args.steps, info.peak_tflops)
            rows.append(row | {"length": label})
            done = row.get("failure") or f"{row['tokens_per_second']:,.0f} tok/s"
            print(f"  {label:<22} {policy:<11} {done}", flush=True)
    del trainee
    release_memory(info.device)

    cuda = info.device.type == "cuda"
    table = [table_row(row, cuda) for row in rows]
    print()
    print(tables.format_table(["length", "policy", "tok/s", "MFU", "step s", "peak"], table))
    model = dataclasses.asdict(cfg.model)
    bench.write_json(args.out, {"environment": env, "model": model, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
