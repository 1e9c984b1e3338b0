"""`memplan profile [HYDRA OVERRIDES]`: run real steps of the plan on this machine's device and
print, per layer, predicted vs measured bytes kept on the device, offloaded to the host and
recomputed; the step peak against the plan; the step time. profile.out=PATH writes JSON.

The plan is plan.path=PATH or a fresh one from the planner; a plan that does not fit the
model, batch or cluster is bad input (exit 2). What runs here (one pipeline stage, per-rank
widths, scaled down on the CPU) is described in framework/measure/setup.py and printed above
the table; each step is the runtime's train step (framework/measure/stage_step.py).

profile.mode=trace runs no real step: one step of the plan's own runtime at its real per-rank
dims under FakeTensorMode with torch's memory trackers (framework/measure/trace.py), and
prints predicted vs traced peak for the traced rank and per phase of the step.
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
from configs.tokens import check_training_tokens
from framework.measure.report import ProfileReport, format_error, median_step_seconds
from framework.measure.trace import TraceReport
from launch.compose import compose_config, warn_config
from launch.plan_source import plan_for
from planner.plan import LayerPlan, Plan, check_plan_matches
from planner.units import format_bytes

logger = logging.getLogger(__name__)


def policy_label(policy: LayerPlan) -> str:
    """'a0.30 r0.30 b0.50 selective' (offload, recompute, anchor-offload fractions; mode)."""
    text = f"a{policy.offload_fraction:.2f} r{policy.recompute_fraction:.2f}"
    text += f" b{policy.anchor_offload_fraction:.2f}"
    return text if policy.recompute == "none" else f"{text} {policy.recompute}"


POLICY_LEGEND = (
    "policy: a = offloaded and r = recomputed fraction of each layer's token-local tensors'"
    " tokens (the rest kept); b = offloaded fraction of its anchors (layer input + attention"
    " core); selective / full: the recompute mode (none when absent)"
)
"""What policy_label's codes mean, printed under the per-layer table."""


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


def plan_label(plan: Plan) -> str:
    """'llama3_2_1b plan (dp=8 tp=1 pp=1 sp=1 zero=2)', the first words of both reports."""
    lay = plan.layout
    degrees = f"dp={lay.dp} tp={lay.tp} pp={lay.pp} sp={lay.sp} zero={lay.zero_stage}"
    return f"{plan.model.name} plan ({degrees})"


def print_report(report: ProfileReport, plan: Plan, console: Console) -> None:
    setup = report.setup
    console.print(
        f"memplan profile: {plan_label(plan)} on {report.device}: micro-batch "
        f"{setup.micro_batch} x {setup.seq_local} tokens, {len(setup.policies)} layers, "
        f"{str(setup.dtype).removeprefix('torch.')}, {len(report.step_seconds)} steps",
        highlight=False,
    )
    for note in setup.notes:
        console.print(f"  {note}", highlight=False)
    console.print(layer_table(report))
    console.print(POLICY_LEGEND, highlight=False)
    for line in summary_lines(report):
        console.print(line, highlight=False)


def trace_table(report: TraceReport) -> Table:
    """Traced peak per phase of the step against the plan's peak, and against the planner's
    prediction for the phases that can hold the peak ("-": not predicted)."""
    table = Table(title="traced peak per phase of step 2 (device bytes)", title_justify="left")
    table.add_column("phase")
    table.add_column("traced peak", justify="right")
    table.add_column("vs predicted peak", justify="right")
    table.add_column("predicted phase", justify="right")
    table.add_column("error", justify="right")
    for phase in report.phases:
        marker = " <- peak" if phase.name == report.peak_phase else ""
        predicted = phase.predicted_peak_bytes
        table.add_row(
            phase.name + marker,
            format_bytes(phase.traced_peak_bytes),
            format_error(phase.traced_peak_bytes, report.predicted_peak_bytes),
            format_bytes(predicted) if predicted else "-",
            format_error(phase.traced_peak_bytes, predicted) if predicted else "-",
        )
    return table


def breakdown_lines(report: TraceReport) -> list[str]:
    """The plan's breakdown and the tracker's categories at the peak."""
    predicted = ", ".join(
        f"{key.removesuffix('_bytes')} {format_bytes(value)}"
        for key, value in report.predicted.items()
    )
    traced = ", ".join(
        f"{key} {format_bytes(value)}"
        for key, value in report.traced_at_peak.items()
        if key != "Total"
    )
    return [f"predicted at peak: {predicted}", f"traced at peak: {traced}"]


def print_trace(report: TraceReport, plan: Plan, console: Console) -> None:
    layout = plan.layout
    console.print(
        f"memplan profile (trace): {plan_label(plan)} traced under FakeTensorMode: "
        f"{report.runtime} with {report.tracker}, rank {report.traced_rank} of "
        f"{report.world_size}, micro-batch {layout.micro_batch_size} x "
        f"{plan.train.seq_len // layout.sp} tokens x {layout.num_microbatches}, "
        f"{len(plan.layers)} layers, {plan.train.dtype}",
        highlight=False,
    )
    for note in report.notes:
        console.print(f"  {note}", highlight=False)
    console.print(trace_table(report))
    console.print(
        f"rank {report.traced_rank}: predicted peak {format_bytes(report.predicted_peak_bytes)}"
        f" traced peak {format_bytes(report.traced_peak_bytes)} "
        f"({format_error(report.traced_peak_bytes, report.predicted_peak_bytes)}) in "
        f"{report.peak_phase}; host predicted {format_bytes(report.predicted_host_bytes)} "
        f"traced {format_bytes(report.traced_host_bytes)}",
        highlight=False,
    )
    for line in breakdown_lines(report):
        console.print(line, highlight=False)
    console.print(
        f"left after the step: {format_bytes(report.traced_after_step_bytes)} (predicted "
        "params + optimizer "
        f"{format_bytes(report.predicted['params_bytes'] + report.predicted['optimizer_bytes'])}"
        f"); freed only by the garbage collector: {format_bytes(report.traced_gc_bytes)}",
        highlight=False,
    )


def write_json(cfg: Config, payload: dict, console: Console) -> None:
    target = Path(cfg.profile.out)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(payload, indent=2) + "\n")
    except OSError as exc:
        raise ConfigError("profile.out", f"cannot write {target}: {exc.strerror}") from exc
    console.print(f"wrote {target}", highlight=False)


def run_trace(cfg: Config, plan: Plan, console: Console) -> int:
    """profile.mode=trace: one traced step; an untraceable layout is one line, exit 0."""
    from framework.measure.trace import trace_plan, untraced_reason
    from planner.memory import predict_phase_peaks as phase_peaks

    check_plan_matches(plan, cfg.model, cfg.cluster, cfg.train)
    reason = untraced_reason(plan)
    if reason is not None:
        console.print(f"memplan profile (trace): {reason}", highlight=False)
        if cfg.profile.out:
            write_json(cfg, {"traced": False, "reason": reason}, console)
        return 0
    try:
        report = trace_plan(cfg.model, cfg.train, plan, predicted_phases=phase_peaks(plan, cfg))
    except ConfigError:
        raise
    except Exception as exc:  # a piece that cannot run under fake tensors: say which, go on
        logger.debug("trace failed", exc_info=True)
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        reason = f"this layout not traced: {type(exc).__name__} under fake tensors: {first}"
        console.print(f"memplan profile (trace): {reason}", highlight=False)
        if cfg.profile.out:
            write_json(cfg, {"traced": False, "reason": reason}, console)
        return 0
    print_trace(report, plan, console)
    if cfg.profile.out:
        write_json(cfg, {"traced": True, **report.to_dict()}, console)
    return 0


def run(args: list[str]) -> int:
    """Compose, take the plan, run it here, print (and write) predicted vs measured."""
    import torch

    from framework.measure.profile import profile_setup, run_profile

    cfg = compose_config(args)
    warn_config(cfg)
    if cfg.data.path is not None:  # profile steps draw random tokens, but a bad path is bad input
        check_training_tokens(
            cfg.data, cfg.train.seq_len, cfg.model.vocab_size, cfg.model.hf_config
        )
    plan = plan_for(cfg)  # plan.path checked as for train, or the planner's plan
    if plan.layout.state_offload != "none":
        # the tracer's fake tensors and the one-process profile put host and device in one
        # memory: they would count the offloaded states as device bytes
        raise ConfigError(
            "layout.state_offload",
            f"{plan.layout.state_offload}: memplan profile measures device memory of plans"
            " that keep their model states on the device; set planner.state_offload=off or"
            " give plan.path= a plan without it",
        )
    if cfg.profile.mode == "trace":
        console = Console(width=None if sys.stdout.isatty() else 200, soft_wrap=False)
        return run_trace(cfg, plan, console)
    use_cuda = cfg.cluster.device == "cuda" and torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    setup = profile_setup(cfg, plan, device, cfg.profile.scale, cfg.profile.seq_len)
    report = run_profile(
        setup, plan, device, cfg.profile.steps, cfg.train.seed, cfg.profile.baseline
    )
    console = Console(width=None if sys.stdout.isatty() else 200, soft_wrap=False)
    print_report(report, plan, console)
    if cfg.profile.out:
        write_json(cfg, report.to_dict(), console)
    return 0
