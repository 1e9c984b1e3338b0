"""`memplan plan [-m|--multirun] [HYDRA OVERRIDES]`: the dry run. Plans (no GPU, no torch)
and prints the layout, the per-GPU memory breakdown, the per-layer policies, the predicted
step time / tokens/s / MFU and how the solver got there. plan.out=PATH writes the plan JSON,
plan.plot=PATH a PNG chart; plan.path=PATH prints an existing plan instead of planning.

Multirun (`-m train.seq_len=32768,131072`) expands sweeps with Hydra's own override parser
and BasicSweeper, plans every point and prints one comparison table; infeasible points are
rows, not crashes. Exit codes (launch/cli.py): 2 bad input, 3 no point feasible.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from configs.errors import ConfigError
from configs.schema import Config
from launch.compose import check_overrides, compose_config, warn_config
from launch.plan_source import plan_for
from launch.run_dir import check_writable_file
from planner.describe import layout_summary
from planner.errors import NoFeasiblePlan
from planner.flops import matmul_params
from planner.plan import LayerPlan, Plan
from planner.units import format_bytes, format_count


def _policy_key(layer: LayerPlan) -> tuple:
    return (
        layer.stage,
        layer.recompute,
        layer.offload_fraction,
        layer.recompute_fraction,
        layer.anchor_offload_fraction,
    )


def layer_runs(plan: Plan) -> list[tuple[int, int, LayerPlan]]:
    """(first index, last index, policy) of each run of consecutive identical layers."""
    runs = []
    for _, group in itertools.groupby(plan.layers, key=_policy_key):
        members = list(group)
        runs.append((members[0].index, members[-1].index, members[0]))
    return runs


def layout_line(plan: Plan) -> str:
    """'dp1 tp2 pp1 sp4 | ZeRO-3 (fsdp2) | 1 seq x 1 micro-batches | no pipeline': the
    trainer's layout summary (planner/describe.py) with the micro-batches."""
    degrees, zero, schedule = layout_summary(plan).split(" | ")
    lay = plan.layout
    batches = f"{lay.micro_batch_size} seq x {lay.num_microbatches} micro-batches"
    return f"{degrees} | {zero} | {batches} | {schedule}"


def policy_totals(plan: Plan) -> str:
    """Short summary: mean offload / anchor-offload / recompute fractions, modes used."""
    n = len(plan.layers)
    off = sum(layer.offload_fraction for layer in plan.layers) / n
    anchor = sum(layer.anchor_offload_fraction for layer in plan.layers) / n
    rec = sum(layer.recompute_fraction for layer in plan.layers) / n
    full = sum(layer.recompute == "full" for layer in plan.layers)
    sel = sum(layer.recompute == "selective" for layer in plan.layers)
    return f"off {off:.2f} anc {anchor:.2f} rec {rec:.2f} full {full} sel {sel}"


def percent(part: float, whole: float) -> str:
    """part of whole as a percentage that never reads as a negative zero: '12.5%', '0.004%',
    '-0.02%', '0%' (exactly nothing)."""
    if not part:
        return "0%"
    if not whole:  # a plan without a budget (written by hand)
        return "-"
    share = 100 * part / whole
    return f"{share:.1f}%" if abs(share) >= 0.1 else f"{share:.1g}%"


def signed_bytes(nbytes: float) -> str:
    """format_bytes with the sign in front of the number: '-11.2 MiB', not '-0.01 GiB'."""
    return f"-{format_bytes(-nbytes)}" if nbytes < 0 else format_bytes(nbytes)


def memory_table(plan: Plan) -> Table:
    m = plan.memory
    table = Table(title="memory per GPU (most loaded pipeline rank)", title_justify="left")
    table.add_column("part")
    table.add_column("bytes", justify="right")
    table.add_column("of budget", justify="right")
    budget = m.gpu_budget_bytes
    rows = [
        ("params", m.params_bytes),
        ("grads", m.grads_bytes),
        ("optimizer states", m.optimizer_bytes),
        ("activations (in flight)", m.activations_bytes),
        ("other (transient, buffers)", m.other_bytes),
    ]
    if m.grads_pending_bytes:  # one micro-batch: the peak comes before all gradients exist
        rows.append(("grads not yet produced at the peak", -m.grads_pending_bytes))
    for name, value in rows:
        table.add_row(name, signed_bytes(value), percent(value, budget))
    table.add_row("[bold]peak[/bold]", f"[bold]{format_bytes(m.gpu_peak_bytes)}[/bold]",
                  percent(m.gpu_peak_bytes, budget))  # fmt: skip
    table.add_row(
        "budget",
        format_bytes(budget),
        f"= {format_bytes(m.gpu_total_bytes)} - {format_bytes(m.reserved_bytes)} reserve",
    )
    host_states = max((r.host_states_bytes for r in plan.ranks), default=0)
    if host_states:  # layout.state_offload: the GPU's parameters, gradients, optimizer state
        table.add_row("model states in host RAM", format_bytes(host_states), "per GPU")
    host_budget = m.host_budget_bytes_per_node or 1
    table.add_row(
        "host RAM per node",
        format_bytes(m.host_bytes_per_node),
        f"{percent(m.host_bytes_per_node, host_budget)} of {format_bytes(host_budget)}",
    )
    return table


def ranks_table(plan: Plan) -> Table:
    table = Table(title="per pipeline rank", title_justify="left")
    # states: params + optimizer + the gradients live at the peak
    for name in ("rank", "stages", "layers", "states", "activations", "other", "peak", "host"):
        table.add_column(name, justify="right")
    for r in plan.ranks:
        states = r.params_bytes + r.grads_bytes + r.optimizer_bytes - r.grads_pending_bytes
        table.add_row(
            str(r.pp_rank),
            ",".join(map(str, r.stages)),
            str(r.num_layers),
            format_bytes(states),
            format_bytes(r.activations_bytes),
            format_bytes(r.other_bytes),
            format_bytes(r.peak_bytes),
            format_bytes(r.host_bytes),
        )
    return table


def layers_table(plan: Plan) -> Table:
    table = Table(
        title="per-layer policy (token-local tensors: offloaded / recomputed / kept; "
        "anchors = layer input + attention core)",
        title_justify="left",
    )
    for name in ("layers", "stage", "recompute", "offload", "recompute tokens", "anchor offload"):
        table.add_column(name, justify="right")
    for first, last, layer in layer_runs(plan):
        span = str(first) if first == last else f"{first}-{last}"
        full = layer.recompute == "full"
        table.add_row(
            span,
            str(layer.stage),
            layer.recompute,
            "-" if full else f"{layer.offload_fraction:.3f}",
            "all" if full else f"{layer.recompute_fraction:.3f}",
            f"{layer.anchor_offload_fraction:.3f}",
        )
    return table


def recompute_note(plan: Plan) -> str | None:
    """Why the busiest pipeline rank's recompute time is 0 s while the plan recomputes layers
    (they sit on other ranks); None when the time speaks for itself."""
    if plan.time.recompute_seconds or plan.layout.pp == 1:
        return None
    full = sum(layer.recompute == "full" for layer in plan.layers)
    selective = sum(layer.recompute == "selective" for layer in plan.layers)
    tokens = sum(
        layer.recompute == "none" and layer.recompute_fraction > 0 for layer in plan.layers
    )
    kinds = [f"{n} {what}" for n, what in ((full, "full"), (selective, "selective"),
                                            (tokens, "token-wise")) if n]  # fmt: skip
    if not kinds:
        return None
    return f"* recompute: {' + '.join(kinds)} layers, all on other pipeline ranks"


def time_table(plan: Plan) -> Table:
    t = plan.time
    note = recompute_note(plan)
    table = Table(title="predicted step", title_justify="left")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("step time", f"{t.step_seconds:.4g} s")
    table.add_row("tokens/s", f"{t.tokens_per_second:,.0f}")
    table.add_row("MFU", f"{100 * t.mfu:.1f}%")
    if plan.layout.pp > 1:  # the parts below are one rank's, not the sum over ranks
        table.add_row("[dim]busiest pipeline rank:[/dim]", "")
    for name in ("compute", "recompute", "exposed_transfer", "exposed_comm", "bubble", "optimizer"):
        value = f"{getattr(t, f'{name}_seconds'):.4g} s"
        marked = name == "recompute" and note is not None
        label = name.replace("_", " ")
        if name == "optimizer" and plan.layout.state_offload != "none":
            label = "optimizer (on the host CPUs)"
        table.add_row(f"  {label}", f"{value}*" if marked else value)
    return table


def flop_formula(cfg: Config) -> str:
    """How MFU is counted, with this model's numbers."""
    m = cfg.model
    return (
        f"MFU = (6 N_matmul + 6 L s n_heads head_dim) FLOPs per token x tokens/s / (GPUs x peak)"
        f" with N_matmul={matmul_params(m):,}, L={m.num_layers}, s={cfg.train.seq_len}, "
        f"n_heads={m.num_heads}, head_dim={m.resolved_head_dim}, {cfg.cluster.world_size} GPUs "
        f"x {cfg.cluster.peak_tflops:g} TFLOP/s; recomputation is not counted"
    )


def print_plan(plan: Plan, cfg: Config, console: Console) -> None:
    """The plan as rich tables."""
    mdl, tr = plan.model, plan.train
    console.print(
        f"[bold]{mdl.name}[/bold] ({format_count(mdl.num_params)} params) on "
        f"[bold]{cfg.cluster.name}[/bold] ({cfg.cluster.num_nodes} x "
        f"{cfg.cluster.gpus_per_node} {cfg.cluster.device}) | seq {tr.seq_len} x "
        f"{tr.global_batch_size} sequences | {tr.dtype}"
    )
    console.print(f"layout: {layout_line(plan)}")
    console.print(memory_table(plan))
    if plan.layout.pp > 1:
        console.print(ranks_table(plan))
    console.print(layers_table(plan))
    console.print(time_table(plan))
    note = recompute_note(plan)
    if note:
        console.print(note, highlight=False)
    console.print(flop_formula(cfg))
    s = plan.solver
    console.print(
        f"solver: {s.name}, {s.status}, {s.solve_seconds:.2f} s, {s.candidates_evaluated} "
        f"MILPs solved of {s.layouts_considered} layouts, gap {s.mip_gap:g}"
    )


PLOT_SUFFIXES = (".png", ".pdf", ".svg")


def plot_path(plot: str) -> Path:
    """The file plan.plot=PATH writes: PATH, or PATH.png when it has no suffix (what
    matplotlib would write); ConfigError for a directory or a file type it cannot draw."""
    target = Path(plot)
    if target.is_dir():
        raise ConfigError(
            "plan.plot", f"{plot} is a directory; give a file name, e.g. {target / 'plan.png'}"
        )
    if not target.suffix:
        return target.with_name(target.name + ".png")
    if target.suffix.lower() not in PLOT_SUFFIXES:
        allowed = ", ".join(PLOT_SUFFIXES)
        raise ConfigError("plan.plot", f"{plot}: allowed file types {allowed}, got {target.suffix}")
    return target


def check_outputs(cfg: Config) -> None:
    """plan.out and plan.plot can be written: checked before planning, so a bad path fails
    fast and nothing is half-written after the plan was printed."""
    if cfg.plan.out:
        check_writable_file(cfg.plan.out, "plan.out")
    if cfg.plan.plot:
        check_writable_file(plot_path(cfg.plan.plot), "plan.plot")


def _write_outputs(plan: Plan, cfg: Config, console: Console) -> None:
    if cfg.plan.out:
        try:
            plan.write(cfg.plan.out)
        except OSError as exc:  # checked before planning; changed since
            raise ConfigError("plan.out", f"cannot write {cfg.plan.out}: {exc.strerror}") from exc
        console.print(f"wrote {cfg.plan.out}")
    if cfg.plan.plot:
        from planner.plot import write_plot

        target = plot_path(cfg.plan.plot)
        try:
            write_plot(plan, target)
        except OSError as exc:
            raise ConfigError("plan.plot", f"cannot write {target}: {exc.strerror}") from exc
        console.print(f"wrote {target}")


def expand_sweep(overrides: Sequence[str]) -> list[list[str]]:
    """Every combination of a multirun's sweeps (Hydra's parser and BasicSweeper)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    check_overrides(overrides)  # names the malformed one
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as exc:
        raise ConfigError("override", str(exc).splitlines()[0]) from exc
    batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return [list(job) for batch in batches for job in batch]


def run_multirun(overrides: Sequence[str], console: Console) -> int:
    """Plan every sweep point; one comparison table. 3 when no point is feasible."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    jobs = expand_sweep(overrides)  # a malformed override is bad input, named
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    swept = [o.key_or_group for o in parsed if o.is_sweep_override()]
    configs = [compose_config(job) for job in jobs]  # bad input fails before any planning
    for cfg in configs:
        warn_config(cfg)
    table = Table(title=f"memplan plan: {len(jobs)} points", title_justify="left")
    for key in swept:
        table.add_column(key, justify="right")
    columns = ("layout", "peak GPU", "host/node", "policies", "step s", "tok/s", "MFU")
    for name in (*columns, "planned in"):  # planned in: this command's time to plan the point
        table.add_column(name, justify="right")
    feasible = 0
    for job, cfg in zip(jobs, configs, strict=True):
        values = dict(item.split("=", 1) for item in job)
        cells = [values.get(key, "") for key in swept]
        started = time.perf_counter()
        try:
            plan = plan_for(cfg)
        except NoFeasiblePlan as exc:
            took = f"{time.perf_counter() - started:.1f} s"
            table.add_row(*cells, f"[red]infeasible[/red]: {exc}", "", "", "", "", "", "", took)
            continue
        feasible += 1
        lay = plan.layout
        table.add_row(
            *cells,
            f"dp{lay.dp} tp{lay.tp} pp{lay.pp} sp{lay.sp} z{lay.zero_stage} "
            f"{lay.micro_batch_size}x{lay.num_microbatches} {lay.pp_schedule}",
            format_bytes(plan.memory.gpu_peak_bytes),
            format_bytes(plan.memory.host_bytes_per_node),
            policy_totals(plan),
            f"{plan.time.step_seconds:.4g}",
            f"{plan.time.tokens_per_second:,.0f}",
            f"{100 * plan.time.mfu:.1f}%",
            f"{time.perf_counter() - started:.1f} s",
        )
    console.print(table)
    return 0 if feasible else 3


def run(args: Sequence[str]) -> int:
    """Entry point of `memplan plan` (launch/cli.py maps ConfigError and NoFeasiblePlan)."""
    from launch.import_command import rewrite_import, run_import

    args = rewrite_import(args)  # import=PATH is plan.import_from=PATH
    multirun = any(a in ("-m", "--multirun") for a in args)
    overrides = [a for a in args if a not in ("-m", "--multirun")]
    if multirun and any(a.startswith("plan.import_from=") for a in overrides):
        raise ConfigError("plan.import_from", "evaluates one config; run it without -m")
    piped = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    console = Console(width=140 if piped else None)  # rich assumes 80 columns in a pipe
    if multirun:
        return run_multirun(overrides, console)
    cfg = compose_config(overrides)
    warn_config(cfg)
    if cfg.plan.import_from:
        return run_import(cfg)
    check_outputs(cfg)
    plan = plan_for(cfg)
    print_plan(plan, cfg, console)
    _write_outputs(plan, cfg, console)
    return 0
