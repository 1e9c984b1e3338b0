"""memplan's activation policies against torch's own tools, step time side by side (CPU):
`python bench/policy_speed.py [--seq 512 1024] [--rounds 15] [--out policy_speed.json]`.

Rows (framework/measure/policy_speed.py says exactly what each side runs): none,
keep-all engine, full, selective, token-wise 25/50/75%, offload 50/100%, and the optimizer
step (fused vs foreach AdamW). For each length, every variant runs in one process on one
model, rotated each round; the ratio is the median over rounds of memplan / torch in the
same round, "extra" is memplan's median step time over the plain layers' minus one, and the
bytes are those kept for backward (device + host), counted each storage once.

The default is quick (hidden 256, 4 layers, seq 256, 3 rounds); the issue's setting is
`--hidden 512 --layers 8 --seq 512 1024 --rounds 15`. --profile prints torch.profiler's top
ops of each variant of the given rows instead of timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
from pathlib import Path

import torch

from framework.measure import policy_speed as ps
from launch.compose import compose_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256, help="model.hidden_size")
    parser.add_argument("--layers", type=int, default=4, help="model.num_layers")
    parser.add_argument("--seq", type=int, nargs="+", default=[256], help="sequence lengths")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step")
    parser.add_argument("--rounds", type=int, default=3, help="rotated rounds per length")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--rows", nargs="+", default=list(ps.ROWS), choices=list(ps.ROWS))
    parser.add_argument("--optimizer-rounds", type=int, default=10, help="0: skip that row")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: stable on a shared machine)"
    )
    parser.add_argument(
        "--clock",
        choices=list(ps.CLOCKS),
        default="cpu",
        help="cpu: the stepping thread's CPU time (with 1 thread); wall: elapsed time",
    )
    parser.add_argument("--profile", action="store_true", help="top ops instead of timing")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("overrides", nargs="*", help="more config overrides (model.ffn_size=...)")
    return parser.parse_args(argv)


def mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f}"


def kept(pair: tuple[int, int]) -> str:
    device, host = pair
    return f"{mib(device)} + {mib(host)}"


def table(result: ps.LengthResult) -> str:
    header = (
        f"{'row':<16} | {'memplan ms':>10} | {'torch ms':>9} | {'memplan/torch':>13} | "
        f"{'extra':>6} | {'kept MiB dev + host: memplan':>28} | {'torch':>13} | torch runs"
    )
    lines = [header, "-" * len(header)]
    for row in result.rows:
        extra = f"{row.extra_over_none * 100:+.1f}%" if row.extra_over_none is not None else "-"
        lines.append(
            f"{row.row:<16} | {row.memplan_seconds * 1e3:>10.1f} | "
            f"{row.torch_seconds * 1e3:>9.1f} | {row.ratio:>12.3f}x | {extra:>6} | "
            f"{kept(row.memplan_bytes):>28} | {kept(row.torch_bytes):>13} | "
            f"{row.torch_key.removeprefix('torch:')}"
        )
    return "\n".join(lines)


def target_lines(result: ps.LengthResult) -> list[str]:
    return [
        f"  {t.name:<40} {t.value:6.3f}  (target <= {t.limit:.2f}: {'met' if t.met else 'MISSED'})"
        for t in ps.targets(result)
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = [f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}"]
    cfg = compose_config(overrides + args.overrides)
    load = os.getloadavg()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; model {cfg.model.name} "
        f"hidden {cfg.model.hidden_size} x {cfg.model.num_layers} layers "
        f"(heads {cfg.model.num_heads}/{cfg.model.num_kv_heads}, ffn {cfg.model.ffn_size}), "
        f"fp32, batch {args.batch}"
    )
    if args.profile:
        for seq in args.seq:
            stack = ps.build_stack(cfg.model, seq, args.batch)
            for row in args.rows:
                for variant in ps.row_variants(row, cfg.model.num_layers):
                    print(f"\nseq {seq} {variant.key}: top ops, self CPU ms per step")
                    for op in ps.profile_variant(stack, variant):
                        print(f"  {op.self_ms:9.2f} ms {op.calls:7.1f} calls  {op.name}")
        return 0
    report: dict = {"load_average": load, "threads": torch.get_num_threads(), "lengths": []}
    for seq in args.seq:
        result = ps.measure_length(
            cfg.model, seq, args.batch, args.rows, args.rounds, args.warmup, args.clock
        )
        print(
            f"\nseq {seq}, batch {args.batch}: medians of {args.rounds} rotated rounds, "
            f"{args.clock} time"
        )
        print(table(result))
        print("\n".join(target_lines(result)))
        report["lengths"].append(dataclasses.asdict(result))
    if args.optimizer_rounds > 0:
        opt = ps.measure_optimizer(cfg.model, cfg.train, args.optimizer_rounds, clock=args.clock)
        print(
            f"\n{ps.OPTIMIZER}: fused {opt.fused_seconds * 1e3:.1f} ms vs foreach "
            f"{opt.foreach_seconds * 1e3:.1f} ms = {opt.ratio:.3f}x "
            f"({opt.parameters / 1e6:.1f}M fp32 parameters, median of {args.optimizer_rounds})"
        )
        report["optimizer"] = dataclasses.asdict(opt)
    report["load_average_after"] = os.getloadavg()
    print(f"load average after: {' '.join(f'{v:.2f}' for v in report['load_average_after'])}")
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    gc.freeze()  # the collection before each step then walks only what the run creates
    raise SystemExit(main())
