"""Does the planner predict the memory a plan really uses? `python bench/estimator_accuracy.py`

For each configuration (model, layers, sequence length, plan) it makes the plan, runs it as
`memplan profile` does and compares the step peak, states + saved activations, and the
bytes per layer with the planner's predictions; then a precision check of the saved bytes
per layer with bf16 weights vs fp32 weights under bf16 autocast. What is measured and how:
framework/measure/accuracy.py. Prints tables, writes JSON (--out), exits 0.

    .venv/bin/python bench/estimator_accuracy.py                 # CPU: scaled-down models
    .venv/bin/python bench/estimator_accuracy.py --trace         # real widths, no GPU
    python3 bench/estimator_accuracy.py --device cuda --out estimator.json     # GPU defaults
    ... --case llama3_2_1b:0:65536:planner --case llama2_7b:4:8192:mix         # own cases
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from configs.schema import Config
from framework.measure.accuracy import (
    CPU_CASES,
    GPU_CASES,
    PEAK_TOLERANCE,
    POLICY_CHOICES,
    Case,
    precision_check,
    run_case,
)
from framework.measure.bench import (
    add_common_args,
    bench_overrides,
    device_from_args,
    scaled,
    write_json,
)
from framework.measure.device import DeviceInfo, environment, environment_line
from framework.measure.report import relative_error
from framework.measure.tables import format_table, percent
from framework.measure.trace_accuracy import (
    PEAK_ABOVE,
    PEAK_BELOW,
    PHASE_TOLERANCE,
    TRACE_CASES,
    run_trace_case,
    within_targets,
)
from launch.compose import compose_config
from planner.units import format_bytes

CASE_HEADERS = (
    "case", "plan", "peak pred", "peak meas", "err", "states+saved pred", "meas", "err",
    "layer dev |err|", "layer host |err|", "step s",
)  # fmt: skip
PRECISION_HEADERS = (
    "setup (runs in)", "layer saved meas", "pred (bf16)", "ratio", "outside meas", "pred",
    "layer input dtypes", "saved by kind (one forward)",
)  # fmt: skip


def _worst(error: float | None) -> str:
    return "-" if error is None else f"{100 * error:.2f}%"


def case_table(rows: list[dict[str, Any]]) -> str:
    body = []
    for row in rows:
        predicted = format_bytes(row["predicted_peak_bytes"])
        if "failure" in row:
            body.append([row["case"], row["policy"], predicted, row["failure"]])
            continue
        worst = row["layer_max_abs_error"]
        saved = row["saved_measured_bytes"], row["saved_predicted_bytes"]
        body.append(
            [
                row["case"],
                row["policy"],
                predicted,
                format_bytes(row["measured_peak_bytes"]),
                percent(row["peak_error"]),
                format_bytes(saved[1]),
                format_bytes(saved[0]),
                percent(relative_error(*saved)),
                _worst(worst["device_bytes"]),
                _worst(worst["host_bytes"]),
                f"{row['step_seconds']:.3f}",
            ]
        )
    return format_table(CASE_HEADERS, body)


def precision_table(rows: list[dict[str, Any]]) -> str:
    body = []
    for row in rows:
        layer = max(row["layer_measured_bytes"])
        kinds = ", ".join(
            f"{k} {format_bytes(v)}" for k, v in sorted(row["saved_bytes_by_kind"].items())
        )
        body.append(
            [
                f"{row['setup']} ({row['runs_in']})",
                format_bytes(layer),
                format_bytes(row["layer_predicted_bytes"]),
                f"{layer / row['layer_predicted_bytes']:.3f}",
                format_bytes(row["outside_measured_bytes"]),
                format_bytes(row["outside_predicted_bytes"]),
                "/".join(sorted(set(row["layer_input_dtypes"]))),
                kinds,
            ]
        )
    return format_table(PRECISION_HEADERS, body)


TRACE_HEADERS = (
    "case", "policy", "layout", "predicted peak", "traced peak", "error", "peak falls in",
    "worst phase", "host pred / traced",
)  # fmt: skip


def trace_table(rows: list[dict[str, Any]]) -> str:
    body = []
    for row in rows:
        head = [row["case"], row["policy"], row["layout"]]
        if "untraced" in row:
            body.append([*head, "not traced: " + row["untraced"]])
            continue
        body.append(
            [
                *head,
                format_bytes(row["predicted_peak_bytes"]),
                format_bytes(row["traced_peak_bytes"]),
                percent(row["peak_error"]),
                row["peak_phase"],
                percent(row["worst_phase_error"]),
                f"{format_bytes(row['predicted_host_bytes'])} / "
                f"{format_bytes(row['traced_host_bytes'])}",
            ]
        )
    return format_table(TRACE_HEADERS, body)


def run_traces(args: argparse.Namespace) -> int:
    """--trace: every TRACE_CASES configuration traced at real widths (no GPU needed)."""
    print(f"estimator accuracy, traced | torch {torch.__version__}")
    rows = []
    for case in TRACE_CASES:
        rows.append(run_trace_case(case, compose_config([*case.overrides, *args.override])))
        print(f"  done: {case.name} ({case.policy})", flush=True)
    print("\npredicted vs traced peak per GPU, rank 0 (error = predicted / traced - 1)")
    print(trace_table(rows))
    traced = [row for row in rows if "untraced" not in row]
    ok = sum(within_targets(row) for row in traced)
    print(
        f"within -{PEAK_BELOW:.0%} / +{PEAK_ABOVE:.0%} (peak) and ±{PHASE_TOLERANCE:.0%} "
        f"(every predicted phase): {ok} of {len(traced)} traced configurations; "
        f"{len(rows) - len(traced)} layouts not traced"
    )
    write_json(args.out, {"torch": torch.__version__, "traced_cases": rows})
    return 0


def config(args: argparse.Namespace, info: DeviceInfo, model: str, layers: int, seq: int) -> Config:
    """The config of one sequence of `seq` tokens on this device (scaled per --scale)."""
    overrides = bench_overrides(model, layers or None, seq, info, args.override)
    return scaled(compose_config(overrides), args.scale, info.device)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, DeviceInfo, list[Case]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument(
        "--case",
        action="append",
        metavar="MODEL:LAYERS:SEQ:POLICY",
        help="a configuration (repeatable; LAYERS 0 = the preset's; POLICY one of "
        + ", ".join(POLICY_CHOICES)
        + "); default: a GPU or a CPU list",
    )
    parser.add_argument("--steps", type=int, default=3, help="steps per case (first warms up)")
    parser.add_argument(
        "--trace",
        action="store_true",
        help="trace the TRACE_CASES at real widths under FakeTensorMode instead of running",
    )
    parser.add_argument("--no-precision-check", action="store_true")
    parser.add_argument(
        "--precision-seq-len", type=int, help="tokens of the precision check (GPU 4096, CPU 128)"
    )
    parser.set_defaults(budget_bytes=36 * 2**20)
    args = parser.parse_args(argv)
    info = device_from_args(parser, args)
    specs = args.case or (GPU_CASES if info.device.type == "cuda" else CPU_CASES)
    try:
        cases = [Case.parse(spec) for spec in specs]
    except ValueError as exc:
        parser.error(str(exc))
    return args, info, cases


def main(argv: list[str] | None = None) -> int:
    args, info, cases = parse_args(argv)
    if args.trace:
        return run_traces(args)
    env = environment(info)
    print(f"estimator accuracy | {environment_line(env)}")
    rows = []
    for case in cases:
        cfg = config(args, info, case.model, case.layers, case.seq_len)
        rows.append(run_case(case, cfg, info, args.steps, args.seed))
        print(f"  done: {case.name}", flush=True)
    print("\npredicted vs measured memory per configuration (one sequence per step)")
    print(case_table(rows))
    ok = [r for r in rows if "failure" not in r]
    within = [r for r in ok if abs(r["peak_error"]) <= PEAK_TOLERANCE]
    source = ok[0]["peak_source"] if ok else "-"
    print(
        f"peak within ±{PEAK_TOLERANCE:.0%}: {len(within)} of {len(ok)} configurations that "
        f"ran ({len(rows) - len(ok)} failed); measured = {source}"
    )
    precision = []
    if not args.no_precision_check:
        seq = args.precision_seq_len or (4096 if info.device.type == "cuda" else 128)
        precision = precision_check(config(args, info, "llama3_2_1b", 2, seq), info, args.seed)
        print("\nsaved activations per decoder layer by precision setup (llama3_2_1b shape, "
              f"2 layers, {seq} tokens, no policy)")  # fmt: skip
        print(precision_table(precision))
    write_json(args.out, {"environment": env, "cases": rows, "precision_check": precision})
    return 0


if __name__ == "__main__":
    sys.exit(main())
