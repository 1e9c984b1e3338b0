"""Tokens/s and MFU per activation policy and sequence length:
`python bench/throughput.py [--device cuda] [--longest longest.json] [--out tput.json]`.

For a llama3_2_1b-shaped model (scaled down on the CPU), each policy of bench/common.py
(none, full, save_on_cpu, plan) at each length: one warm-up step, then --steps timed steps
of one sequence (forward, chunked cross-entropy, backward, optimizer step); the median step
gives tokens/s, and MFU uses planner/flops.py's formula (6 x params + attention FLOPs per
token; recomputation is not counted as useful work) against the device's dense peak.

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
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    POLICIES,
    Trainee,
    add_common_args,
    bench_config,
    describe_device,
    environment,
    environment_line,
    format_table,
    mfu,
    release_memory,
    resolve_device,
    seq_label,
    with_seq_len,
    write_json,
)
from configs.schema import Config
from planner.errors import NoFeasiblePlan
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


def measure(
    trainee: Trainee, policy: str, cfg: Config, seq_len: int, steps: int, peak_tflops: float
) -> dict[str, Any]:
    """One warm-up and `steps` timed steps of seq_len tokens under `policy`."""
    row: dict[str, Any] = {"policy": policy, "seq_len": seq_len}
    if policy == "plan":
        from planner.search import make_plan

        cfg = with_seq_len(cfg, seq_len)
        try:
            plan = make_plan(cfg, explain=False)
        except NoFeasiblePlan:
            return row | {"failure": "no feasible plan"}
        row["predicted_step_seconds"] = plan.time.step_seconds
        trainee.use_policy("plan", plan, cfg)
    else:
        trainee.use_policy(policy)
    result = trainee.run(seq_len, steps + 1, track_memory=False)
    release_memory(trainee.device)
    if result.failure is not None:
        return row | {"failure": result.failure}
    timed = sorted(result.seconds[1:])  # the first step warms up (allocations, kernels)
    median = timed[len(timed) // 2]
    tokens_per_second = seq_len / median
    return row | {
        "step_seconds": median,
        "tokens_per_second": tokens_per_second,
        "mfu": mfu(cfg, seq_len, tokens_per_second, peak_tflops),
        "peak_bytes": result.device_peak_bytes,
        "host_bytes": result.host_bytes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--model", default="llama3_2_1b")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the preset's)")
    parser.add_argument("--policy", action="append", choices=POLICIES, help="repeatable")
    parser.add_argument("--lengths", help="comma-separated (default GPU 8192,32768; CPU 128,512)")
    parser.add_argument("--longest", help="bench/longest_sequence.py's JSON: adds its lengths")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    default = "8192,32768" if cuda else "128,512"
    names: dict[int, list[str]] = {n: [] for n in map(int, (args.lengths or default).split(","))}
    if args.longest:
        for name, n in lengths_from_longest(args.longest).items():
            names.setdefault(n, []).append(name)
    lengths = {
        seq_label(n) + (f" ({', '.join(extra)})" if extra else ""): n
        for n, extra in sorted(names.items())
    }
    info = describe_device(device, args.budget_bytes, args.peak_tflops)
    cfg = bench_config(args.model, args.layers, min(lengths.values()), info, args.scale,
                       args.override)  # fmt: skip
    env = environment(info)
    print(f"throughput | {environment_line(env)}")
    m = cfg.model
    print(
        f"model {m.name}: {m.num_layers} layers, hidden {m.hidden_size}, heads {m.num_heads}/"
        f"{m.num_kv_heads}; peak {info.peak_tflops} TFLOP/s; median of {args.steps} steps"
    )
    trainee = Trainee(cfg, device, args.seed)
    rows: list[dict[str, Any]] = []
    for label, seq_len in lengths.items():
        for policy in args.policy or POLICIES:
            row = measure(trainee, policy, cfg, seq_len, args.steps, info.peak_tflops)
            rows.append(row | {"length": label})
            done = row.get("failure") or f"{row['tokens_per_second']:,.0f} tok/s"
            print(f"  {label:<22} {policy:<11} {done}", flush=True)
    del trainee
    release_memory(device)

    table = []
    for row in rows:
        if "failure" in row:
            table.append([row["length"], row["policy"], row["failure"][:40], "-", "-", "-"])
            continue
        table.append(
            [
                row["length"],
                row["policy"],
                f"{row['tokens_per_second']:,.0f}",
                f"{100 * row['mfu']:.1f}%",
                f"{row['step_seconds']:.3f}",
                format_bytes(row["peak_bytes"]) if cuda else "-",
            ]
        )
    print()
    print(format_table(["length", "policy", "tok/s", "MFU", "step s", "peak"], table))
    write_json(args.out, {"environment": env, "model": cfg.model.__dict__, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
