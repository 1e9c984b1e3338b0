"""The MILP for one layout (the only PuLP import in memplan).

Given the layout (dp, tp, pp, sp, ZeRO stage, micro-batch, schedule) and its cost
coefficients (planner/costs.py), choose how many decoder layers each pipeline stage gets and,
per layer, the recompute mode and the token fractions to offload and recompute.

Layers are identical, so a stage's layers are described by how many of them use each mode and
by the SUMS of their fractions; the plan gives every layer of a (stage, mode) group the
group's mean fraction. That is exact: memory and time are linear in the fractions, and the
exposed transfer time max(0, bytes/bandwidth - compute) is convex, so equal fractions are
optimal for a given sum. This replaces the bilinear "binary mode x continuous fraction" of a
per-layer model by disaggregated per-mode copies of each continuous variable.

Symbols (c: global stage, m: recompute mode in {none, selective, full}, p: pp rank,
t: a vector of in-flight micro-batches per stage of rank p; all bytes per micro-batch unless
said otherwise):
    anchor_m, local_m   anchor / token-local saved bytes of one layer in mode m
    x                   the layer input bytes (full mode keeps only this)
    f, b_m, w           forward, backward (with mode m's own recompute), weight-grad seconds
    r                   seconds to recompute every token's local part of one layer
    bw                  host link bytes/s
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
import warnings
from dataclasses import dataclass, field

import pulp

from planner.costs import LayoutCosts
from planner.schedules import INTERLEAVED, ZERO_BUBBLE, StageMap

SPLIT_MODES = ("none", "selective")
"""Modes whose token-local tensors can be split into offloaded / recomputed / kept tokens."""
ROUNDING_MARGIN_BYTES = 2**20
"""Slack for token rounding and shard padding in the exact evaluation of the plan."""
UNIT = 2**30
"""Bytes per unit of the memory rows (GiB)."""


@dataclass(frozen=True)
class StageChoice:
    """The solution for one pipeline stage: layers per mode and fraction sums per mode."""

    layers: dict[str, int]
    offload_sum: dict[str, float]
    recompute_sum: dict[str, float]
    anchor_offload_sum: dict[str, float]


@dataclass(frozen=True)
class MilpResult:
    """Outcome of one solve; `stages` is empty unless a solution was found."""

    status: str
    """pulp.LpStatus name of the solve."""
    solution_status: str
    """pulp.LpSolution name (optimal, or a feasible solution at the time/gap limit)."""
    objective: float
    seconds: float
    stages: tuple[StageChoice, ...] = field(default_factory=tuple)
    time_limited: bool = False
    """The solve stopped at its time limit (the solution, if any, is not proven optimal)."""

    @property
    def found(self) -> bool:
        return bool(self.stages)


_BANNER_SILENCED = False


def _silence_highs_banner() -> None:
    """highspy prints a banner to stdout when its first Highs object is created, whatever
    the options; create that first object with stdout pointed at /dev/null."""
    global _BANNER_SILENCED
    if _BANNER_SILENCED:
        return
    _BANNER_SILENCED = True
    import highspy

    with contextlib.ExitStack() as stack:
        saved = os.dup(1)
        stack.callback(os.close, saved)
        devnull = os.open(os.devnull, os.O_WRONLY)
        stack.callback(os.close, devnull)
        os.dup2(devnull, 1)
        stack.callback(os.dup2, saved, 1)
        highspy.Highs()


def solver_name(choice: str) -> str:
    """'HiGHS' or 'CBC' for planner.solver (auto: HiGHS when highspy is importable)."""
    if choice == "cbc":
        return "CBC"
    highs_ok = pulp.HiGHS().available()
    if choice == "highs" and not highs_ok:
        from configs.errors import ConfigError

        raise ConfigError("planner.solver", "highs requested but highspy is not installed")
    return "HiGHS" if highs_ok else "CBC"


def _solver(
    name: str, time_limit: float, gap: float, cutoff: float | None, mip: bool = True
) -> pulp.LpSolver:
    """A bounded solver; `cutoff` prunes every branch that cannot beat it (no solution
    below it reads as infeasible); mip=False solves the LP relaxation."""
    if name == "HiGHS":
        _silence_highs_banner()
        options = {} if cutoff is None else {"objective_bound": cutoff}
        return pulp.HiGHS(
            mip=mip, msg=False, timeLimit=time_limit, gapRel=gap, threads=1, **options
        )
    options = [] if cutoff is None else [f"cutoff {cutoff!r}"]
    with warnings.catch_warnings():  # PuLP 3.3 deprecates its bundled CBC, still the fallback
        warnings.simplefilter("ignore", DeprecationWarning)
        return pulp.PULP_CBC_CMD(
            mip=mip, msg=False, timeLimit=time_limit, gapRel=gap, options=options
        )


def solve_layout(
    costs: LayoutCosts,
    stages: StageMap,
    num_layers: int,
    solver: str,
    time_limit: float,
    gap: float,
    objective: str = "time",
    cutoff: float | None = None,
    floors: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> MilpResult:
    """Build and solve the MILP for one layout.

    objective "time": minimal step time within the GPU and host budgets.
    objective "gpu": minimal per-GPU peak (GPU and host budgets dropped: what the GPU
    needs even with unlimited host RAM).
    objective "host": minimal host bytes per node (host budget dropped; GPU budget kept).
    cutoff: only solutions with a smaller objective are wanted (the best step time so far);
    a layout that cannot beat it comes back without a solution, status "Cut off".
    floors: lower bounds of the slowest stage, the busiest rank and the largest zero-bubble
    residue (planner/bounds.py computes them for the best integer layer split); valid cuts
    that spare the branch and bound proving them.
    """
    started = time.perf_counter()
    lay = costs.layout
    S, L, G = stages.num_stages, num_layers, lay.num_microbatches
    first, last = 0, S - 1
    prob = pulp.LpProblem("memplan_layout", pulp.LpMinimize)
    modes = list(costs.modes)

    most = L - S + 1  # layers one stage can hold: the big-M of the indicator rows

    # ---------------------------------------------------------------- decision variables
    # N[c] ∈ Z, 1..L-S+1: number of layers of stage c (branching on it first pays off)
    N = {c: prob.add_variable(f"N_{c}", 1, most, cat=pulp.LpInteger) for c in range(S)}
    # n[c][m] ∈ Z≥0: number of layers of stage c that use recompute mode m (no "full" where
    # the layout cannot run it)
    mode_most = {m: most if m != "full" or costs.full_recompute else 0 for m in modes}
    n = {
        c: {m: prob.add_variable(f"n_{c}_{m}", 0, mode_most[m], cat=pulp.LpInteger) for m in modes}
        for c in range(S)
    }
    # A[c][m] ∈ [0, L]: sum over those layers of offload_fraction (token-local tensors)
    A = {
        c: {m: prob.add_variable(f"A_{c}_{m}", 0, L if costs.offload else 0) for m in SPLIT_MODES}
        for c in range(S)
    }
    # R[c][m] ∈ [0, L]: sum over those layers of recompute_fraction (token-wise recompute)
    R = {c: {m: prob.add_variable(f"R_{c}_{m}", 0, L) for m in SPLIT_MODES} for c in range(S)}
    # Bq[c][m] ∈ [0, L]: sum over those layers of anchor_offload_fraction
    Bq = {
        c: {m: prob.add_variable(f"Bq_{c}_{m}", 0, L if costs.offload else 0) for m in modes}
        for c in range(S)
    }
    # Xf[c][m], Xb[c][m] ≥ 0: host-transfer seconds not hidden behind forward / backward
    Xf = {c: {m: prob.add_variable(f"Xf_{c}_{m}", 0) for m in modes} for c in range(S)}
    Xb = {c: {m: prob.add_variable(f"Xb_{c}_{m}", 0) for m in modes} for c in range(S)}
    # y[p] ∈ {0, 1}: rank p offloads or recomputes something (its backward re-materialises)
    y = [prob.add_variable(f"y_{p}", cat=pulp.LpBinary) for p in range(lay.pp)]
    # uA[p][m], uB[p][m] ∈ {0, 1}: rank p offloads token-local tensors / anchors of mode-m layers
    uA = [
        {m: prob.add_variable(f"uA_{p}_{m}", cat=pulp.LpBinary) for m in SPLIT_MODES}
        for p in range(lay.pp)
    ]
    uB = [
        {m: prob.add_variable(f"uB_{p}_{m}", cat=pulp.LpBinary) for m in modes}
        for p in range(lay.pp)
    ]
    # pf[p] ≥ 0: GiB of the next layer prefetched from the host during a backward on rank p
    pf = [prob.add_variable(f"prefetch_{p}", 0) for p in range(lay.pp)]
    # hst[p] ≥ 0: peak offloaded GiB of one GPU of pp rank p (all in-flight micro-batches)
    hst = [prob.add_variable(f"host_{p}", 0) for p in range(lay.pp)]
    # M: the slowest stage's time per micro-batch; Mr: the busiest rank's (lower bounds: the
    # best integer layer split without any recompute, `floors`)
    M = prob.add_variable("max_stage_seconds", floors[0])
    Mr = prob.add_variable("max_rank_seconds", floors[1])
    # Mz: the largest zero-bubble residue F + B - 3W of a stage
    Mz = prob.add_variable("max_zero_bubble_seconds", floors[2])
    # tail ≥ 0: optimizer step + end-of-step ZeRO traffic not hidden (slowest rank)
    tail = prob.add_variable("tail_seconds", 0)

    # -------------------------------------------------------------------- expressions
    cost = costs.modes
    # memory rows are written in GiB (UNIT): byte-sized coefficients next to seconds-sized
    # ones make the solver's tolerances meaningless
    anchor = {m: cost[m].anchor_bytes / UNIT for m in modes}
    local = {m: cost[m].local_bytes / UNIT for m in modes}

    def kept_group_bytes(c: int, m: str) -> pulp.LpAffineExpression:
        """Device-resident saved bytes of stage c's mode-m layers (one micro-batch)."""
        if m in SPLIT_MODES:
            return anchor[m] * (n[c][m] - Bq[c][m]) + local[m] * (n[c][m] - A[c][m] - R[c][m])
        return anchor[m] * (n[c][m] - Bq[c][m])

    def kept_bytes(c: int) -> pulp.LpAffineExpression:
        return pulp.lpSum(kept_group_bytes(c, m) for m in modes)

    def host_bytes(c: int, m: str) -> pulp.LpAffineExpression:
        offloaded = local[m] * A[c][m] if m in SPLIT_MODES else 0
        return anchor[m] * Bq[c][m] + offloaded

    def extra_params(c: int) -> int:
        return (costs.first.params if c == first else 0) + (costs.last.params if c == last else 0)

    def params(p: int) -> pulp.LpAffineExpression:
        return pulp.lpSum(
            costs.layer_params * N[c] + extra_params(c) for c in stages.rank_stages[p]
        )

    def stage_constant_bytes(c: int) -> float:
        boundary = (c > first) + (c < last) if lay.pp > 1 else 0
        saved = costs.chunk_saved_bytes + boundary * costs.boundary_bytes
        saved += costs.first.saved_bytes if c == first else 0
        saved += costs.last.saved_bytes if c == last else 0
        return saved / UNIT

    fwd_s = {
        c: costs.forward_seconds * N[c]
        + (costs.first.forward_seconds if c == first else 0)
        + (costs.last.forward_seconds if c == last else 0)
        + (costs.p2p_seconds if c < last else 0)
        for c in range(S)
    }
    bwd_s = {
        c: pulp.lpSum(cost[m].backward_seconds * n[c][m] for m in modes)
        + pulp.lpSum(cost[m].local_recompute_seconds * R[c][m] for m in SPLIT_MODES)
        + pulp.lpSum(Xf[c][m] + Xb[c][m] for m in modes)
        + costs.layer_zero_exposed_seconds * N[c]
        + (costs.first.backward_seconds + costs.first.zero_exposed_seconds if c == first else 0)
        + (costs.last.backward_seconds + costs.last.zero_exposed_seconds if c == last else 0)
        + (costs.p2p_seconds if c > first else 0)
        for c in range(S)
    }
    wgt_s = {
        c: costs.weight_grad_seconds * N[c] + (costs.last.weight_grad_seconds if c == last else 0)
        for c in range(S)
    }
    stage_s = {c: fwd_s[c] + bwd_s[c] for c in range(S)}

    # --------------------------------------------------------------------- constraints
    # [Constraint] every layer sits in exactly one stage (every stage has at least one:
    #   N's lower bound), and a stage's layers are split over the recompute modes
    prob += pulp.lpSum(N.values()) == L, "all_layers_assigned"
    for c in range(S):
        prob += pulp.lpSum(n[c].values()) == N[c], f"stage_{c}_modes"

    # [Constraint] per layer: offload_fraction + recompute_fraction <= 1, anchor fraction <= 1
    #   summed over a (stage, mode) group of n layers:  A + R <= n,  Bq <= n
    for c in range(S):
        for m in SPLIT_MODES:
            prob += A[c][m] + R[c][m] <= n[c][m], f"split_{c}_{m}"
        for m in modes:
            prob += Bq[c][m] <= n[c][m], f"anchor_split_{c}_{m}"

    # [Constraint] y[p] = 1 when rank p offloads or recomputes anything (big-M: 3 x most)
    #   original: y[p] = OR(A > 0, R > 0, Bq > 0, n_selective > 0, n_full > 0)
    for p, chunk_list in enumerate(stages.rank_stages):
        for c in chunk_list:
            touched = pulp.lpSum(A[c].values()) + pulp.lpSum(R[c].values())
            touched += pulp.lpSum(Bq[c].values()) + n[c]["selective"] + n[c]["full"]
            prob += touched <= 3 * most * y[p], f"rematerialises_{c}"

    # [Constraint] uA / uB = 1 when rank p offloads local tensors / anchors of mode m;
    #   pf[p] >= the largest per-layer prefetch: max_m (anchor_m uB[p][m] + local_m uA[p][m])
    #   original: pf = max over p's layers l of host_bytes(l), bounded by whole tensors
    for p, chunk_list in enumerate(stages.rank_stages):
        for c in chunk_list:
            for m in SPLIT_MODES:
                prob += A[c][m] <= most * uA[p][m], f"offloads_local_{c}_{m}"
            for m in modes:
                prob += Bq[c][m] <= most * uB[p][m], f"offloads_anchor_{c}_{m}"
        for m in modes:
            fetched = local[m] * uA[p][m] if m in SPLIT_MODES else 0
            prob += pf[p] >= anchor[m] * uB[p][m] + fetched, f"prefetch_{p}_{m}"

    # [Constraint] exposed host transfer, per (stage, mode) group, forward and backward
    #   original per layer: Xf_l = max(0, host_l / bw - f),  Xb_l = max(0, host_l / bw - b_l)
    bw = costs.host_link / UNIT
    for c in range(S):
        for m in modes:
            rec = cost[m].local_recompute_seconds * R[c][m] if m in SPLIT_MODES else 0
            prob += (
                Xf[c][m] >= host_bytes(c, m) / bw - costs.forward_seconds * n[c][m],
                (f"exposed_fwd_{c}_{m}"),
            )
            prob += (
                Xb[c][m] >= host_bytes(c, m) / bw - cost[m].backward_seconds * n[c][m] - rec,
                (f"exposed_bwd_{c}_{m}"),
            )

    # [Constraint] GPU peak per rank: for every maximal in-flight vector t of rank p
    #   states + sum_c t_c (kept_c + constants_c) + buffers + transient <= budget
    #   transient = max(layer backward phase, loss phase); the layer phase holds one layer's
    #   re-materialised tensors when y[p] = 1 plus the next layer's prefetch pf[p]
    peak = prob.add_variable("peak_gib", 0) if objective == "gpu" else None
    budget = (costs.budget_bytes - ROUNDING_MARGIN_BYTES) / UNIT
    buffers = (2 * costs.boundary_bytes if lay.pp > 1 else 0.0) / UNIT
    layer_phase = (costs.workspace_bytes + costs.zero_layer_transient_bytes) / UNIT
    loss_phase = (costs.loss_transient_bytes + costs.zero_output_transient_bytes) / UNIT
    full_layer = costs.full_layer_bytes / UNIT

    def gpu_row(total: pulp.LpAffineExpression, name: str) -> None:
        if peak is not None:
            prob.addConstraint(peak >= total, f"peak_{name}")
        else:
            prob.addConstraint(total <= budget, f"gpu_memory_{name}")

    for p, chunk_list in enumerate(stages.rank_stages):
        states = costs.state_bytes_per_param / UNIT * params(p)
        phases = [layer_phase + full_layer * y[p] + pf[p]]
        if last in chunk_list:
            phases.append(loss_phase)
        if costs.grads_follow_backward:
            # One micro-batch, no pipeline (one rank, one stage): gradients appear during
            # backward as activations are freed. Backward runs the loss, then the layers
            # last to first: by mode group "none", "selective", "full" (layer_policies
            # emits a stage's layers in MODE_ORDER), then the embedding. Within a group of
            # identical layers the live bytes change linearly, so the group's boundaries
            # bound them: at each boundary b (0: before any layer, 3: after the last)
            #   states - grads + constants + kept(groups not yet run) + grads(output layer
            #   + layers run) + one layer's grads + layer transient <= budget
            # plus the loss phase (all kept, output-layer grads, loss transient) and the
            # embedding's backward (all layer grads + its own).
            per = costs.grads_bytes_per_param / UNIT
            layer_grads = per * costs.layer_params
            base = states - per * params(p) + stage_constant_bytes(0) + per * costs.last.params
            kept = {m: kept_group_bytes(0, m) for m in modes}
            gpu_row(base + pulp.lpSum(kept.values()) + phases[-1], f"{p}_loss")
            backward = ("none", "selective", "full")
            for b in range(len(backward) + 1):
                waiting, ran = backward[b:], backward[:b]
                live = base + pulp.lpSum(kept[m] for m in waiting)
                live += layer_grads * pulp.lpSum(n[0][m] for m in ran)
                gpu_row(live + layer_grads + phases[0], f"{p}_backward_{b}")
            gpu_row(base + layer_grads * N[0] + per * costs.first.params, f"{p}_embedding")
            continue
        for k, vec in enumerate(stages.inflight[p]):
            act = pulp.lpSum(
                count * (kept_bytes(c) + stage_constant_bytes(c))
                for count, c in zip(vec, chunk_list, strict=True)
                if count
            )
            for j, transient in enumerate(phases):
                gpu_row(states + act + buffers + transient, f"{p}_{k}_{j}")

    # [Constraint] host RAM: hst[p] >= offloaded bytes of every in-flight vector of rank p,
    #   and per node: sum over its GPUs of (hst + checkpoint staging) <= host budget
    host_peak = prob.add_variable("host_peak_gib", 0) if objective == "host" else None
    for p, chunk_list in enumerate(stages.rank_stages):
        for k, vec in enumerate(stages.inflight[p]):
            offloaded = pulp.lpSum(
                count * host_bytes(c, m)
                for count, c in zip(vec, chunk_list, strict=True)
                if count
                for m in modes
            )
            prob += hst[p] >= offloaded, f"host_rank_{p}_{k}"
    # token rounding (planner/search.py snaps offloaded tokens up) adds at most two tokens
    # per layer and in-flight micro-batch to each GPU's host bytes
    token_bytes = costs.full_layer_bytes / costs.seq_local
    most_inflight = max(sum(vec) for rank in stages.inflight for vec in rank)
    rounding = 2 * L * token_bytes * most_inflight * costs.gpus_per_node
    host_budget = (costs.host_budget_bytes - ROUNDING_MARGIN_BYTES - rounding) / UNIT
    for k, gpus in enumerate(stages.node_gpus):
        node = pulp.lpSum(
            count * (hst[p] + costs.staging_bytes_per_param / UNIT * params(p))
            for p, count in enumerate(gpus)
            if count
        )
        if host_peak is not None:
            prob += host_peak >= node, f"host_peak_node_{k}"
        elif objective == "gpu":
            continue
        else:
            prob += node <= host_budget, f"host_memory_node_{k}"

    # [Constraint] pipeline latency epigraphs (planner/schedules.py has the formulas)
    #   M >= t_c,  Mr >= sum of rank p's t_c,  Mz >= F_c + B_c - 3 W_c
    for c in range(S):
        prob += stage_s[c] <= M, f"max_stage_{c}"
        prob += Mz >= fwd_s[c] + bwd_s[c] - 3 * wgt_s[c], f"zero_bubble_{c}"
    for p, chunk_list in enumerate(stages.rank_stages):
        prob += Mr >= pulp.lpSum(stage_s[c] for c in chunk_list), f"max_rank_{p}"

    # [Constraint] step tail: optimizer + exposed end-of-step ZeRO traffic, slowest rank
    #   original: tail = max_p (opt_p + exposed_p + max(0, overlapped_p - backward_p))
    for p, chunk_list in enumerate(stages.rank_stages):
        base = (costs.optimizer_seconds_per_param + costs.zero_exposed_end_seconds_per_param) * (
            params(p)
        )
        overlapped = costs.zero_overlapped_seconds_per_param * params(p)
        prob += tail >= base, f"tail_{p}"
        prob += (
            tail >= base + overlapped - pulp.lpSum(bwd_s[c] for c in chunk_list),
            (f"tail_overlap_{p}"),
        )

    # ---------------------------------------------------------------------- objective
    schedule = lay.pp_schedule
    if schedule == "none":
        step = G * stage_s[0] + tail
    elif schedule in ("gpipe", "1f1b"):
        step = (G - 1) * M + pulp.lpSum(stage_s.values()) + tail
    elif schedule in ZERO_BUBBLE:
        step = G * Mr + (lay.pp - 1) * Mz + tail
    else:
        assert schedule in INTERLEAVED
        step = G * Mr + (lay.pp - 1) * M + tail
    if objective == "gpu":
        prob += peak + 1e-6 * step
    elif objective == "host":
        prob += host_peak + 1e-6 * step
    else:
        prob += step

    def read(cut: float | None, limit: float, relaxed: bool = False) -> MilpResult:
        """Solve prob as it stands and read the result by status name."""
        began = time.perf_counter()
        if relaxed:
            prob.solve(_solver(solver, max(limit, 0.01), gap, None, mip=False))
        else:
            prob.solve(_solver(solver, max(limit, 0.01), gap, cut))
        status = pulp.LpStatus[prob.status]
        solution = pulp.LpSolution[prob.sol_status]
        seconds = time.perf_counter() - began
        # HiGHS names why it stopped (PuLP folds "Time limit reached" and "Objective bound"
        # into one status); CBC: a solution short of optimal means the time limit
        if solver == "HiGHS":
            reason = prob.solverModel.modelStatusToString(prob.solverModel.getModelStatus())
            time_limited = reason == "Time limit reached"
        else:
            time_limited = status == "Not Solved" or solution == "Solution Found"
        found = solution in ("Optimal Solution Found", "Solution Found")
        if cut is not None and (not found or float(pulp.value(prob.objective)) >= cut):
            return MilpResult("Cut off", "No solution below the cutoff", float("inf"), seconds,
                              time_limited=time_limited)  # fmt: skip
        if not found:
            return MilpResult(status, solution, float("inf"), seconds, time_limited=time_limited)

        def value(var: pulp.LpVariable) -> float:
            return float(var.varValue or 0.0)

        choices = tuple(
            StageChoice(
                layers={m: value(n[c][m]) if relaxed else round(value(n[c][m])) for m in modes},
                offload_sum={m: value(A[c][m]) for m in SPLIT_MODES},
                recompute_sum={m: value(R[c][m]) for m in SPLIT_MODES},
                anchor_offload_sum={m: value(Bq[c][m]) for m in modes},
            )
            for c in range(S)
        )
        objective_value = float(pulp.value(prob.objective))
        if objective in ("gpu", "host"):
            objective_value *= UNIT
        return MilpResult(status, solution, objective_value, seconds, choices, time_limited)

    # A pipeline's hard part is the integer layer split. First a quick incumbent: the LP
    # relaxation's split rounded (largest remainders), policies solved for that split; then
    # the full MILP only has to beat it (a cutoff), within what is left of the time limit.
    heuristic = None
    if S > 1 and objective == "time":
        relaxation = read(None, time_limit, relaxed=True)
        if not relaxation.found:  # the relaxation is infeasible: so is the MILP
            return dataclasses.replace(relaxation, seconds=time.perf_counter() - started)
        if cutoff is not None and relaxation.objective >= cutoff:  # a lower bound already
            return MilpResult("Cut off", "No solution below the cutoff", float("inf"),
                              time.perf_counter() - started)  # fmt: skip
        split = _round_split([N[c].varValue or 1.0 for c in range(S)], L)
        for c in range(S):
            N[c].lowBound = N[c].upBound = split[c]
        heuristic = read(cutoff, time_limit - (time.perf_counter() - started))
        for c in range(S):
            N[c].lowBound, N[c].upBound = 1, most
    remaining = time_limit - (time.perf_counter() - started)
    cut = cutoff
    if heuristic is not None and heuristic.found:
        cut = heuristic.objective if cut is None else min(cut, heuristic.objective)
    full = read(cut, remaining)
    seconds = time.perf_counter() - started
    if full.found or heuristic is None or not heuristic.found:
        return dataclasses.replace(full, seconds=seconds)
    # nothing beats the heuristic: it is the optimum unless the full solve ran out of time
    proven = "Solution Found" if full.time_limited else "Optimal Solution Found"
    return dataclasses.replace(
        heuristic, solution_status=proven, seconds=seconds, time_limited=full.time_limited
    )


def _round_split(fractional: list[float], total: int) -> list[int]:
    """Integers >= 1 summing to total, closest to `fractional` (largest remainders)."""
    floors = [max(1, math.floor(x + 1e-9)) for x in fractional]
    while sum(floors) > total:  # only if the relaxation left stages below one layer
        floors[floors.index(max(floors))] -= 1
    order = sorted(range(len(fractional)), key=lambda i: fractional[i] - floors[i], reverse=True)
    for i in order[: total - sum(floors)]:
        floors[i] += 1
    return floors
