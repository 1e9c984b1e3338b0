"""`memplan profile [HYDRA OVERRIDES]`: run real steps of the plan on this machine's device and
print, per layer, predicted vs measured bytes kept on the device, offloaded to the host and
recomputed; the step peak against the plan; the step time. profile.out=PATH writes JSON.

The plan is plan.path=PATH or a fresh one from the planner; a plan that does not fit the
model, batch or cluster is bad input (exit 2). What runs here (one pipeline stage, per-rank
widths, scaled down on the CPU) is described in framework/measure/setup.py and printed above
the table; each step is the runtime's train step (framework/measure/stage_step.py).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from configs.errors import ConfigError
from configs.schema import Config
from framework.measure.report import ProfileReport, format_error, median_step_seconds
from launch.compose import compose_config
from planner.plan import LayerPlan, Plan
from planner.units import format_bytes

logger = logging.getLogger(__name__)


def plan_for_profile(cfg: Config) -> Plan:
    """plan.path, or the planner's plan for cfg."""
    if cfg.plan.path:
        return Plan.read(cfg.plan.path)
    try:
        from planner.make import make_plan
    except ImportError as exc:
        raise ConfigError(
            "plan.path", "no planner search in this memplan: pass plan.path=PLAN.json"
        ) from exc
    return make_plan(cfg)


def policy_label(policy: LayerPlan) -> str:
    """'a0.30 r0.30 b0.50 selective' (offload, recompute, anchor-offload fractions; mode)."""
    text = f"a{policy.offload_fraction:.2f} r{policy.recompute_fraction:.2f}"
    text += f" b{policy.anchor_offload_fraction:.2f}"
    return text if policy.recompute == "none" else f"{text} {policy.recompute}"


def layer_table(report: ProfileReport) -> Table:
    """Per-layer predicted vs measured bytes (one micro-batch)."""
    table = Table(title="saved activations per layer (one micro-batch)", title_justify="left")
    table.add_column("layer", justify="right")
    table.add_column("policy")
    for group in ("device kept", "host offloaded", "recomputed"):
        table.add_column(f"{group}\npredicted", justify="right")
        table.add_column("measured", justify="right")
        table.add_column("err", justify="right")
    totals = [0] * 6
    for row in report.rows:
        pairs = [
            (row.predicted.device_bytes, row.measured.device_bytes),
            (row.predicted.host_bytes, row.measured.host_bytes),
            (row.predicted.recomputed_bytes, row.measured.recomputed_bytes),
        ]
        cells = []
        for position, (predicted, measured) in enumerate(pairs):
            totals[2 * position] += predicted
            totals[2 * position + 1] += measured
            cells += [
                format_bytes(predicted),
                format_bytes(measured),
                format_error(measured, predicted),
            ]
        table.add_row(str(row.index), policy_label(row.policy), *cells)
    cells = []
    for position in range(3):
        predicted, measured = totals[2 * position], totals[2 * position + 1]
        cells += [
            format_bytes(predicted),
            format_bytes(measured),
            format_error(measured, predicted),
        ]
    table.add_section()
    table.add_row("all", "", *cells)
    return table


def summary_lines(report: ProfileReport) -> list[str]:
    """Peak, step time and host-slab lines under the table."""
    lines = []
    if report.device.startswith("cuda"):
        lines.append(
            f"peak allocated {format_bytes(report.peak_measured_bytes)} vs predicted for this "
            f"run (states + saved activations) {format_bytes(report.peak_predicted_bytes)} "
            f"({format_error(report.peak_measured_bytes, report.peak_predicted_bytes)}); "
            f"plan gpu_peak_bytes {format_bytes(report.plan_peak_bytes)} "
            f"({format_error(report.peak_measured_bytes, report.plan_peak_bytes)})"
        )
    else:
        lines.append(
            f"peak = measured saved activations {format_bytes(report.activation_measured_bytes)}"
            f" + model states {format_bytes(report.state_measured_bytes)} = "
            f"{format_bytes(report.peak_measured_bytes)} vs predicted for this run "
            f"{format_bytes(report.peak_predicted_bytes)} "
            f"({format_error(report.peak_measured_bytes, report.peak_predicted_bytes)}); "
            f"the plan's gpu_peak_bytes {format_bytes(report.plan_peak_bytes)} is for its "
            "real dims and layout"
        )
    step = median_step_seconds(report.step_seconds)
    line = f"step time {1000 * step:.1f} ms (median of {max(1, len(report.step_seconds) - 1)})"
    if report.baseline_step_seconds:
        base = median_step_seconds(report.baseline_step_seconds)
        line += f"; without policies {1000 * base:.1f} ms ({step / base:.3f}x)"
        if report.baseline_peak_bytes is not None:
            line += f", peak {format_bytes(report.baseline_peak_bytes)}"
    lines.append(line)
    lines.append(
        f"host slabs allocated: {report.host_slab_allocations} "
        f"({report.host_slab_allocations_after_first_step} after step 1)"
    )
    return lines


def print_report(report: ProfileReport, plan: Plan, console: Console) -> None:
    setup = report.setup
    layout = plan.layout
    console.print(
        f"memplan profile: {plan.model.name} plan (dp={layout.dp} tp={layout.tp} pp={layout.pp}"
        f" sp={layout.sp} zero={layout.zero_stage}) on {report.device}: micro-batch "
        f"{setup.micro_batch} x {setup.seq_local} tokens, {len(setup.policies)} layers, "
        f"{str(setup.dtype).removeprefix('torch.')}, {len(report.step_seconds)} steps",
        highlight=False,
    )
    for note in setup.notes:
        console.print(f"  {note}", highlight=False)
    console.print(layer_table(report))
    for line in summary_lines(report):
        console.print(line, highlight=False)


def run(args: list[str]) -> int:
    """Compose, take the plan, run it here, print (and write) predicted vs measured."""
    import torch

    from framework.measure.profile import profile_setup, run_profile

    cfg = compose_config(args)
    plan = plan_for_profile(cfg)
    use_cuda = cfg.cluster.device == "cuda" and torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    setup = profile_setup(cfg, plan, device, cfg.profile.scale, cfg.profile.seq_len)
    report = run_profile(
        setup, plan, device, cfg.profile.steps, cfg.train.seed, cfg.profile.baseline
    )
    console = Console(width=None if sys.stdout.isatty() else 200, soft_wrap=False)
    print_report(report, plan, console)
    if cfg.profile.out:
        target = Path(cfg.profile.out)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        except OSError as exc:
            raise ConfigError("profile.out", f"cannot write {target}: {exc.strerror}") from exc
        console.print(f"wrote {target}", highlight=False)
    return 0
