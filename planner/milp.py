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

LayoutMilp builds the problem (variables, constraints, objective); solve() runs one bounded
solve and reads the status by name; read() makes the MilpResult. solve_layout runs them.
"""

from __future__ import annotations

import dataclasses
import time
import warnings

import pulp

from planner.costs import REDUCE_BYTES, LayoutCosts, dtype_bytes
from planner.highs import silence_highs_banner
from planner.modes import BACKWARD_GROUP_ORDER, RECOMPUTE_MODES, SPLIT_MODES
from planner.schedules import StageMap, pipeline_step
from planner.solution import (
    CUT_OFF,
    OUT_OF_RANGE,
    MilpResult,
    Solved,
    StageChoice,
    round_split,
)

ROUNDING_MARGIN_BYTES = 2**20
"""Slack for token rounding and shard padding in the exact evaluation of the plan."""
UNIT = 2**30
"""Bytes per unit of the memory rows (GiB)."""

LARGEST_COEFFICIENT = 1e12
"""Largest coefficient, constant or objective weight (seconds, GiB) a layout's rows may carry.
HiGHS refuses a matrix entry above 1e15 (its large_matrix_value), then reports the empty
model optimal and PuLP fails reading it (IndexError); its tolerances mean nothing well before
that. A layout beyond this (train.seq_len=10^12: 10^16 seconds per layer) is not solved."""


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
        silence_highs_banner()
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


class LayoutMilp:
    """The MILP of one layout. Constructing it builds the problem: the decision variables
    (below), the constraints (the _add_*_rows methods) and the objective; solve() and read()
    may then run several times (solve_layout fixes the layer split for a first incumbent)."""

    def __init__(
        self,
        costs: LayoutCosts,
        stages: StageMap,
        num_layers: int,
        objective: str = "time",
        floors: tuple[float, float, float] = (0.0, 0.0, 0.0),
    ) -> None:
        self.costs, self.stages, self.objective = costs, stages, objective
        self.num_layers = L = num_layers
        self.num_stages = S = stages.num_stages
        pp = costs.layout.pp
        self.prob = pulp.LpProblem("memplan_layout", pulp.LpMinimize)
        self.most = most = L - S + 1  # layers one stage can hold: the big-M of the indicators
        add = self.prob.add_variable
        offload_most = L if costs.offload else 0

        def per_group(
            symbol: str, modes: tuple, high: dict | float | None, cat: str = pulp.LpContinuous
        ) -> dict[int, dict[str, pulp.LpVariable]]:
            """symbol_{c}_{m} >= 0 for every stage c and mode m (upper bound `high`)."""
            highs = high if isinstance(high, dict) else dict.fromkeys(modes, high)
            return {
                c: {m: add(f"{symbol}_{c}_{m}", 0, highs[m], cat=cat) for m in modes}
                for c in range(S)
            }

        def per_rank(symbol: str, modes: tuple) -> list[dict[str, pulp.LpVariable]]:
            """Binary symbol_{p}_{m} for every pp rank p and mode m."""
            return [
                {m: add(f"{symbol}_{p}_{m}", cat=pulp.LpBinary) for m in modes} for p in range(pp)
            ]

        # ---------------------------------------------------------------- decision variables
        # The LP names are the symbols: PuLP orders the columns by name, and the solver's path
        # with them (renamed columns can end a solve at another of several equal optima).
        # N[c] ∈ Z, 1..L-S+1: number of layers of stage c (branching on it first pays off)
        self.stage_layers = {c: add(f"N_{c}", 1, most, cat=pulp.LpInteger) for c in range(S)}
        # n[c][m] ∈ Z≥0: number of layers of stage c that use recompute mode m (no "full" where
        # the layout cannot run it)
        full = costs.full_recompute
        mode_most = {m: most if m != "full" or full else 0 for m in RECOMPUTE_MODES}
        self.mode_layers = per_group("n", RECOMPUTE_MODES, mode_most, cat=pulp.LpInteger)
        # A[c][m] ∈ [0, L]: sum over those layers of offload_fraction (token-local tensors)
        self.offload_sum = per_group("A", SPLIT_MODES, offload_most)
        # R[c][m] ∈ [0, L]: sum over those layers of recompute_fraction (token-wise recompute)
        self.recompute_sum = per_group("R", SPLIT_MODES, L)
        # Bq[c][m] ∈ [0, L]: sum over those layers of anchor_offload_fraction
        self.anchor_offload_sum = per_group("Bq", RECOMPUTE_MODES, offload_most)
        # Xf[c][m] ≥ 0: host-transfer seconds of the group not hidden behind its forward
        self.exposed_forward = per_group("Xf", RECOMPUTE_MODES, None)
        # Xb[c][m] ≥ 0: host-transfer seconds of the group not hidden behind its backward
        self.exposed_backward = per_group("Xb", RECOMPUTE_MODES, None)
        # y[p] ∈ {0, 1}: rank p offloads or recomputes something (its backward re-materialises)
        self.rematerialises = [add(f"y_{p}", cat=pulp.LpBinary) for p in range(pp)]
        # uA[p][m] ∈ {0, 1}: rank p offloads token-local tensors of mode-m layers
        self.offloads_local = per_rank("uA", SPLIT_MODES)
        # uB[p][m] ∈ {0, 1}: rank p offloads anchors of mode-m layers
        self.offloads_anchor = per_rank("uB", RECOMPUTE_MODES)
        # prefetch[p] ≥ 0: GiB of the next layer prefetched from the host during a backward
        # on rank p
        self.prefetch_gib = [add(f"prefetch_{p}", 0) for p in range(pp)]
        # host[p] ≥ 0: peak offloaded GiB of one GPU of pp rank p (all in-flight micro-batches)
        self.host_gib = [add(f"host_{p}", 0) for p in range(pp)]
        # M: the slowest stage's time per micro-batch (lower bound: the best integer layer
        # split without any recompute, `floors`)
        self.max_stage_seconds = add("max_stage_seconds", floors[0])
        # Mr: the busiest rank's time per micro-batch (lower bound likewise)
        self.max_rank_seconds = add("max_rank_seconds", floors[1])
        # Mz: the largest zero-bubble residue F + B - 3W of a stage (lower bound likewise)
        self.max_zero_bubble_seconds = add("max_zero_bubble_seconds", floors[2])
        # tail ≥ 0: optimizer step + end-of-step ZeRO traffic not hidden (slowest rank)
        self.tail_seconds = add("tail_seconds", 0)
        # peak ≥ 0 (objective "gpu" only): the per-GPU peak GiB, minimised
        self.peak_gib = add("peak_gib", 0) if objective == "gpu" else None
        # host_peak ≥ 0 (objective "host" only): the host GiB of the fullest node, minimised
        self.host_peak_gib = add("host_peak_gib", 0) if objective == "host" else None

        self._add_stage_times()
        self._add_layer_rows()
        self._add_indicator_rows()
        self._add_transfer_rows()
        self._add_gpu_memory_rows()
        self._add_host_memory_rows()
        self._add_latency_rows()
        self._add_tail_rows()
        self._set_objective()

    def largest_coefficient(self) -> float:
        """The largest magnitude among the rows' coefficients and constants and the
        objective's weights."""
        rows = [*self.prob.constraints(), self.prob.objective]
        return max((abs(x) for row in rows for x in (*row.values(), row.constant)), default=0.0)

    # -------------------------------------------------------------------- expressions
    # memory rows are written in GiB (UNIT): byte-sized coefficients next to seconds-sized
    # ones make the solver's tolerances meaningless

    def anchor_gib(self, m: str) -> float:
        """anchor_m in GiB."""
        return self.costs.modes[m].anchor_bytes / UNIT

    def local_gib(self, m: str) -> float:
        """local_m in GiB."""
        return self.costs.modes[m].local_bytes / UNIT

    def kept_group_gib(self, c: int, m: str) -> pulp.LpAffineExpression:
        """Device-resident saved bytes of stage c's mode-m layers (one micro-batch)."""
        n, anchor_offload = self.mode_layers[c][m], self.anchor_offload_sum[c][m]
        if m in SPLIT_MODES:
            offload, recompute = self.offload_sum[c][m], self.recompute_sum[c][m]
            return self.anchor_gib(m) * (n - anchor_offload) + self.local_gib(m) * (
                n - offload - recompute
            )
        return self.anchor_gib(m) * (n - anchor_offload)

    def kept_gib(self, c: int) -> pulp.LpAffineExpression:
        return pulp.lpSum(self.kept_group_gib(c, m) for m in RECOMPUTE_MODES)

    def host_group_gib(self, c: int, m: str) -> pulp.LpAffineExpression:
        """Offloaded bytes of stage c's mode-m layers (one micro-batch)."""
        offloaded = self.local_gib(m) * self.offload_sum[c][m] if m in SPLIT_MODES else 0
        return self.anchor_gib(m) * self.anchor_offload_sum[c][m] + offloaded

    def rank_params(self, p: int) -> pulp.LpAffineExpression:
        """Parameters of pp rank p: its stages' layers plus the first/last-stage extras."""
        costs, S = self.costs, self.num_stages
        return pulp.lpSum(
            costs.layer_params * self.stage_layers[c] + costs.stage_extra_params(c, S)
            for c in self.stages.rank_stages[p]
        )

    def stage_constant_gib(self, c: int) -> float:
        return self.costs.stage_constant_bytes(c, self.num_stages) / UNIT

    def _add_stage_times(self) -> None:
        """F_c, B_c, W_c and t_c = F_c + B_c of every stage, per micro-batch."""
        costs, cost, last = self.costs, self.costs.modes, self.num_stages - 1
        N, n, R = self.stage_layers, self.mode_layers, self.recompute_sum
        Xf, Xb = self.exposed_forward, self.exposed_backward
        stages = range(self.num_stages)
        self.forward_s = {
            c: costs.forward_seconds * N[c]
            + (costs.first.forward_seconds if c == 0 else 0)
            + (costs.last.forward_seconds if c == last else 0)
            + (costs.p2p_seconds if c < last else 0)
            for c in stages
        }
        self.backward_s = {
            c: pulp.lpSum(cost[m].backward_seconds * n[c][m] for m in RECOMPUTE_MODES)
            + pulp.lpSum(cost[m].local_recompute_seconds * R[c][m] for m in SPLIT_MODES)
            + pulp.lpSum(Xf[c][m] + Xb[c][m] for m in RECOMPUTE_MODES)
            + costs.layer_zero_exposed_seconds * N[c]
            + (costs.first.backward_seconds + costs.first.zero_exposed_seconds if c == 0 else 0)
            + (costs.last.backward_seconds + costs.last.zero_exposed_seconds if c == last else 0)
            + (costs.p2p_seconds if c > 0 else 0)
            for c in stages
        }
        self.weight_grad_s = {
            c: costs.weight_grad_seconds * N[c]
            + (costs.last.weight_grad_seconds if c == last else 0)
            for c in stages
        }
        self.stage_s = {c: self.forward_s[c] + self.backward_s[c] for c in stages}

    # --------------------------------------------------------------------- constraints
    def _add_layer_rows(self) -> None:
        prob, N, n = self.prob, self.stage_layers, self.mode_layers
        A, R, Bq = self.offload_sum, self.recompute_sum, self.anchor_offload_sum
        # [Constraint] every layer sits in exactly one stage (every stage has at least one:
        #   N's lower bound), and a stage's layers are split over the recompute modes
        prob += pulp.lpSum(N.values()) == self.num_layers, "all_layers_assigned"
        for c in range(self.num_stages):
            prob += pulp.lpSum(n[c].values()) == N[c], f"stage{c}_layers_split_over_modes"

        # [Constraint] per layer: offload_fraction + recompute_fraction <= 1, anchor fraction <= 1
        #   summed over a (stage, mode) group of n layers:  A + R <= n,  Bq <= n
        for c in range(self.num_stages):
            for m in SPLIT_MODES:
                prob += A[c][m] + R[c][m] <= n[c][m], f"stage{c}_{m}_local_split_fits_layers"
            for m in RECOMPUTE_MODES:
                prob += Bq[c][m] <= n[c][m], f"stage{c}_{m}_anchor_split_fits_layers"

    def _add_indicator_rows(self) -> None:
        prob, n, most = self.prob, self.mode_layers, self.most
        A, R, Bq = self.offload_sum, self.recompute_sum, self.anchor_offload_sum
        y, uA, uB = self.rematerialises, self.offloads_local, self.offloads_anchor
        # [Constraint] y[p] = 1 when rank p offloads or recomputes anything (big-M: 3 x most)
        #   original: y[p] = OR(A > 0, R > 0, Bq > 0, n_selective > 0, n_full > 0)
        for p, chunk_list in enumerate(self.stages.rank_stages):
            for c in chunk_list:
                touched = pulp.lpSum(A[c].values()) + pulp.lpSum(R[c].values())
                touched += pulp.lpSum(Bq[c].values()) + n[c]["selective"] + n[c]["full"]
                prob += touched <= 3 * most * y[p], f"rank{p}_stage{c}_rematerialise_flag"

        # [Constraint] uA / uB = 1 when rank p offloads local tensors / anchors of mode m;
        #   prefetch[p] >= the largest per-layer prefetch:
        #     max_m (anchor_m uB[p][m] + local_m uA[p][m])
        #   original: prefetch = max over p's layers l of host_bytes(l), bounded by whole tensors
        for p, chunk_list in enumerate(self.stages.rank_stages):
            for c in chunk_list:
                for m in SPLIT_MODES:
                    prob += A[c][m] <= most * uA[p][m], f"rank{p}_stage{c}_{m}_local_offload_flag"
                for m in RECOMPUTE_MODES:
                    prob += Bq[c][m] <= most * uB[p][m], f"rank{p}_stage{c}_{m}_anchor_offload_flag"
            for m in RECOMPUTE_MODES:
                fetched = self.local_gib(m) * uA[p][m] if m in SPLIT_MODES else 0
                most_fetched = self.anchor_gib(m) * uB[p][m] + fetched
                prob += self.prefetch_gib[p] >= most_fetched, f"rank{p}_{m}_prefetch_bound"

    def _add_transfer_rows(self) -> None:
        costs, cost, n, R = self.costs, self.costs.modes, self.mode_layers, self.recompute_sum
        # [Constraint] exposed host transfer, per (stage, mode) group, forward and backward
        #   original per layer: Xf_l = max(0, host_l / bw - f),  Xb_l = max(0, host_l / bw - b_l)
        bw = costs.host_link / UNIT
        for c in range(self.num_stages):
            for m in RECOMPUTE_MODES:
                rec = cost[m].local_recompute_seconds * R[c][m] if m in SPLIT_MODES else 0
                host = self.host_group_gib(c, m)
                self.prob += (
                    self.exposed_forward[c][m] >= host / bw - costs.forward_seconds * n[c][m],
                    f"stage{c}_{m}_exposed_forward_transfer",
                )
                self.prob += (
                    self.exposed_backward[c][m]
                    >= host / bw - cost[m].backward_seconds * n[c][m] - rec,
                    f"stage{c}_{m}_exposed_backward_transfer",
                )

    def _add_gpu_row(self, total: pulp.LpAffineExpression, name: str, budget: float) -> None:
        """total <= the GPU budget, or (objective "gpu") peak >= total."""
        if self.peak_gib is not None:
            self.prob.addConstraint(self.peak_gib >= total, f"{name}_gpu_peak")
        else:
            self.prob.addConstraint(total <= budget, f"{name}_gpu_memory")

    def _add_gpu_memory_rows(self) -> None:
        costs, last = self.costs, self.num_stages - 1
        budget = (costs.budget_bytes - ROUNDING_MARGIN_BYTES) / UNIT
        # [Constraint] GPU peak per rank: for every maximal in-flight vector t of rank p
        #   states + sum_c t_c (kept_c + constants_c) + buffers + transient <= budget
        #   buffers: pipeline buffers, FSDP2's gathered roots (and ZeRO-2's gathered layers);
        #   transient = max(layer backward phase, loss phase); the layer phase holds one
        #   layer's re-materialised tensors when y[p] = 1 plus the next layer's prefetch[p]
        full_layer = costs.full_layer_bytes / UNIT
        layer_phase = costs.layer_backward_bound_bytes / UNIT
        loss_phase = (costs.loss_transient_bytes + costs.zero_output_transient_bytes) / UNIT
        for p, chunk_list in enumerate(self.stages.rank_stages):
            states = costs.state_bytes_per_param / UNIT * self.rank_params(p)
            states += costs.owner_imbalance_bytes / UNIT  # torch's ZeRO-1 (else 0)
            root = costs.gathered_root_bytes(list(chunk_list), self.num_stages) / UNIT
            if costs.grads_follow_backward:
                self._add_one_backward_rows(p, states, root, budget)
                continue
            rematerialised = full_layer * self.rematerialises[p] + self.prefetch_gib[p]
            buffers = (2 * costs.boundary_bytes if costs.layout.pp > 1 else 0.0) / UNIT + root
            if costs.layout.zero_stage == 2:  # FSDP2 (else 0): gathered forward to backward
                gathered = costs.gathered_layer_bytes / UNIT
                buffers += gathered * pulp.lpSum(self.stage_layers[c] for c in chunk_list)
            phases = {"layer_backward": layer_phase + rematerialised}
            if last in chunk_list:
                phases["loss"] = loss_phase
            for k, vec in enumerate(self.stages.inflight[p]):
                act = pulp.lpSum(
                    count * (self.kept_gib(c) + self.stage_constant_gib(c))
                    for count, c in zip(vec, chunk_list, strict=True)
                    if count
                )
                for phase, transient in phases.items():
                    name = f"rank{p}_inflight_vector{k}_{phase}_phase"
                    self._add_gpu_row(states + act + buffers + transient, name, budget)

    def _group_indicator(
        self, name: str, count: pulp.LpAffineExpression, least: int
    ) -> pulp.LpVariable:
        """Binary `name` = [count >= least] for an integer count of layers in 0..L."""
        flag = self.prob.add_variable(name, cat=pulp.LpBinary)
        self.prob += flag >= (count - (least - 1)) * (1.0 / self.num_layers), f"{name}_lower"
        self.prob += least * flag <= count, f"{name}_upper"
        return flag

    def _add_one_backward_rows(
        self,
        p: int,
        states: pulp.LpAffineExpression,
        root: float,
        budget: float,
    ) -> None:
        """The GPU rows of a step whose gradients follow its one backward (planner/memory.py's
        backward_instants gives the exact instants these rows bound)."""
        costs, n, L = self.costs, self.mode_layers, self.num_layers
        # [Constraint] GPU peak of a step whose gradients follow its backward:
        # One micro-batch, no pipeline (one rank, one stage): gradients appear during
        # backward as activations are freed. Backward runs the loss, then the layers last to
        # first: by mode group "none", "selective", "full" (BACKWARD_GROUP_ORDER:
        # layer_policies emits a stage's layers in STAGE_LAYER_ORDER), then the embedding.
        # Each layer's backward has two instants (planner/costs.py): its SwiGLU backward
        # (present_m of its own activations back on the device, the gradients before it,
        # the next layer's prefetch, T_mlp) and its end (its input left, its own gradients,
        # T_end); the model's last layer follows the output's reduce-scatter (T_first), the
        # others a layer's (T_inner). Within a group of identical layers the instants change
        # linearly, so its first and last layer bound them. live(b), the bytes at the start
        # of group b (b = 0..3), is
        #   states - grads + constants + gathered root + grads(output layer + layers run)
        #   + kept(groups not yet run) (+ ZeRO-2 under FSDP2: gathered layers not yet run)
        # and kept1 of a group's layer is at least K_b / L (K_b: the group's kept bytes;
        # exact for a uniform policy). With v_b = [group b has a layer], w_b = [it has
        # two], u_b = [a layer ran before group b], dup_b the anchors' second copy when
        # they are split with the host (uB), the rows are:
        #   forward start   states - grads + constants + 2 x root (its all-gather buffer)
        #   loss            live(0) + loss working set
        #   first of b      live(b) - K_b/L + present_m v_b + dup_b + arriving + T_mlp(u_b)
        #   second of b     live(b) - 2 K_b/L + layer grads + present_m + dup_b + arriving
        #                   + T_mlp inner, if w_b
        #   last of b       live(b+1) - layer grads + present_m + dup_b + arriving
        #                   + T_mlp inner, if v_b
        #   MLP norm, first / last of b: the same with the MLP's tensors freed (present_m
        #                   - mlp_present_m) and T_norm2, when it can exceed the SwiGLU rows
        #   end, first of b live(b) - K_b/L + arriving + T_end(u_b), if v_b
        #   end, last of b  live(b+1) - layer grads + gathered layer + arriving + T_end, if v_b
        #   embedding       live(3) + its gradients (+ FSDP2's unsharded copy and fp32 input)
        # (every MLP row + prefetch[p], the next layer's offloaded tensors)
        per = costs.grads_bytes_per_param / UNIT
        layer_grads = per * costs.layer_params
        arriving_mlp, arriving_end = (x / UNIT for x in costs.arriving_grads_bytes)
        gathered = (costs.gathered_layer_bytes if costs.layout.zero_stage == 2 else 0.0) / UNIT
        t_mlp = {first: costs.layer_backward_bytes(first) / UNIT for first in (True, False)}
        t_end = {first: costs.layer_end_bytes(first) / UNIT for first in (True, False)}
        t_spread = max(t_mlp.values()) - min(t_mlp.values())
        no_grads = states - per * self.rank_params(p) + self.stage_constant_gib(0)
        if root:  # the root's all-gather buffer (or fp32 copy) beside its gathered copy
            start = no_grads + root * (1 + costs.gather_copy_factor)
            self._add_gpu_row(start, f"rank{p}_forward_start", budget)
        # the output layer's gradients (the embedding's when tied on this stage) come first
        tied_grads = costs.output_is_embedding and not costs.fsdp2_units
        base = no_grads + root + per * (costs.last.params + tied_grads * costs.first.params)
        kept = {m: self.kept_group_gib(0, m) for m in RECOMPUTE_MODES}
        loss = base + pulp.lpSum(kept.values()) + gathered * L
        if costs.fsdp2_units:  # the output's gradients are reduce-scattered after the loss
            loss -= per * costs.last.params
        loss_phase = costs.loss_transient_bytes + costs.zero_output_transient_bytes
        self._add_gpu_row(loss + loss_phase / UNIT, f"rank{p}_loss", budget)
        norm = base + pulp.lpSum(kept.values()) + gathered * L - costs.boundary_bytes / UNIT
        norm += costs.final_norm_backward_bytes / UNIT
        self._add_gpu_row(norm, f"rank{p}_final_norm_backward", budget)
        backward = BACKWARD_GROUP_ORDER
        last_saved = costs.last.saved_bytes / UNIT  # freed by the final norm's backward
        prefetch = self.prefetch_gib[p]
        end_excess = max(t_end.values()) + arriving_end - min(t_mlp.values()) - arriving_mlp
        # the MLP norm's backward: the MLP's tensors freed, the norm's temporaries (traced:
        # the layer's peak under tensor parallelism, where the MLP shrinks with tp)
        t_norm2 = {first: costs.layer_norm2_bytes(first) / UNIT for first in (True, False)}
        arriving_norm2 = costs.arriving_norm2_grads_bytes / UNIT
        least_mlp = min(costs.mlp_present_bytes(m) for m in RECOMPUTE_MODES) / UNIT
        norm2_excess = (
            max(t_norm2.values()) + arriving_norm2 - min(t_mlp.values()) - arriving_mlp - least_mlp
        )
        for b, m in enumerate(backward):
            ran_layers = pulp.lpSum(n[0][r] for r in backward[:b])
            live = base + pulp.lpSum(kept[w] for w in backward[b:]) + layer_grads * ran_layers
            live += gathered * (L - ran_layers) - last_saved
            after = live - kept[m] + layer_grads * n[0][m] - gathered * n[0][m]  # live(b+1)
            name = f"rank{p}_backward_group{b}"
            present_m = costs.present_bytes(m) / UNIT
            dup = self.anchor_gib(m) * self.offloads_anchor[p][m]
            one_layer = kept[m] * (1.0 / L)  # at most one layer's kept bytes: K_b / n_b
            present = self._group_indicator(f"v_{p}_{b}", n[0][m], 1)
            if b == 0:
                t_first, t_end_first = 0.0 + t_mlp[True], 0.0 + t_end[True]
                t_norm2_first = 0.0 + t_norm2[True]
            else:
                ran_any = self._group_indicator(f"u_{p}_{b}", ran_layers, 1)
                t_first = t_mlp[True] + (t_mlp[False] - t_mlp[True]) * ran_any
                t_end_first = t_end[True] + (t_end[False] - t_end[True]) * ran_any
                t_norm2_first = t_norm2[True] + (t_norm2[False] - t_norm2[True]) * ran_any
            mlp = arriving_mlp + dup + prefetch
            first = live - one_layer + present_m * present + mlp + t_first
            self._add_gpu_row(first, f"{name}_first_layer", budget)
            # rows of absent layers are switched off by a big-M that makes them implied by
            # the row of the first layer (the same or a later live(b))
            relax = present_m + self.anchor_gib(m) + t_spread + layer_grads + 1e-3
            last = after - layer_grads + present_m + mlp + t_mlp[False] - relax * (1 - present)
            self._add_gpu_row(last, f"{name}_last_layer", budget)
            two = self._group_indicator(f"w_{p}_{b}", n[0][m], 2)
            second = live - 2 * one_layer + layer_grads + present_m + mlp + t_mlp[False]
            self._add_gpu_row(second - relax * (1 - two), f"{name}_second_layer", budget)
            if norm2_excess > 0:  # the MLP norms' backward can exceed the SwiGLU instants
                present_norm2 = present_m - costs.mlp_present_bytes(m) / UNIT
                rest = dup + prefetch + arriving_norm2
                relax_norm2 = relax + norm2_excess + 1e-3
                norm2_first = live - one_layer + present_norm2 * present + rest + t_norm2_first
                self._add_gpu_row(norm2_first, f"{name}_mlp_norm_of_first_layer", budget)
                norm2_last = after - layer_grads + present_norm2 + rest + t_norm2[False]
                norm2_last -= relax_norm2 * (1 - present)
                self._add_gpu_row(norm2_last, f"{name}_mlp_norm_of_last_layer", budget)
            if end_excess > 0:  # the ends can exceed the SwiGLU instants
                relax_end = end_excess + layer_grads + gathered + 1e-3
                # the next layer's prefetch is still there at a layer's last instant
                end_first = live - one_layer + arriving_end + t_end_first + prefetch
                end_first -= relax_end * (1 - present)
                self._add_gpu_row(end_first, f"{name}_end_of_first_layer", budget)
                end_last = after - layer_grads + gathered + arriving_end + t_end[False] + prefetch
                end_last -= relax_end * (1 - present)
                self._add_gpu_row(end_last, f"{name}_end_of_last_layer", budget)
        embedding = base + layer_grads * self.stage_layers[0]
        # a tied embedding: its dense gradient beside the loss's and their sum
        embedding += (2 if tied_grads else 1) * per * costs.first.params
        embedding -= last_saved
        if costs.fsdp2_units:
            embedding += (
                (dtype_bytes(costs.dtype) + REDUCE_BYTES) * costs.first.params
                + costs.reduce_scatter_layer_bytes
            ) / UNIT
        self._add_gpu_row(embedding, f"rank{p}_embedding_backward", budget)

    def _add_host_memory_rows(self) -> None:
        costs, stages, host = self.costs, self.stages, self.host_gib
        # [Constraint] host RAM: host[p] >= offloaded bytes of every in-flight vector of rank p,
        #   and per node: sum over its GPUs of (host + offloaded model states + checkpoint
        #   staging) <= host budget
        for p, chunk_list in enumerate(stages.rank_stages):
            for k, vec in enumerate(stages.inflight[p]):
                offloaded = pulp.lpSum(
                    count * self.host_group_gib(c, m)
                    for count, c in zip(vec, chunk_list, strict=True)
                    if count
                    for m in RECOMPUTE_MODES
                )
                self.prob += host[p] >= offloaded, f"rank{p}_inflight_vector{k}_offloaded_gib"
        # token rounding (planner/assemble.py snaps offloaded tokens up) adds at most two
        # tokens per layer and in-flight micro-batch to each GPU's host bytes
        token_bytes = costs.full_layer_bytes / costs.seq_local
        most_inflight = max(sum(vec) for rank in stages.inflight for vec in rank)
        rounding = 2 * self.num_layers * token_bytes * most_inflight * costs.gpus_per_node
        host_budget = (costs.host_budget_bytes - ROUNDING_MARGIN_BYTES - rounding) / UNIT
        for k, gpus in enumerate(stages.node_gpus):
            node = pulp.lpSum(
                count
                * (
                    host[p]
                    + costs.host_resident_bytes_per_param / UNIT * self.rank_params(p)
                    + costs.host_state_constant_bytes / UNIT
                )
                for p, count in enumerate(gpus)
                if count
            )
            if self.host_peak_gib is not None:
                self.prob += self.host_peak_gib >= node, f"node_kind{k}_host_peak"
            elif self.objective == "gpu":
                continue
            else:
                self.prob += node <= host_budget, f"node_kind{k}_host_memory"

    def _add_latency_rows(self) -> None:
        prob, M, Mr = self.prob, self.max_stage_seconds, self.max_rank_seconds
        Mz = self.max_zero_bubble_seconds
        # [Constraint] pipeline latency epigraphs (planner/schedules.py has the formulas)
        #   M >= t_c,  Mr >= sum of rank p's t_c,  Mz >= F_c + B_c - 3 W_c
        #   original: M = max_c t_c,  Mr = max_p sum_c t_c,  Mz = max_c (F_c + B_c - 3 W_c)
        for c in range(self.num_stages):
            prob += self.stage_s[c] <= M, f"stage{c}_within_max_stage_seconds"
            residue = self.forward_s[c] + self.backward_s[c] - 3 * self.weight_grad_s[c]
            prob += Mz >= residue, f"stage{c}_within_max_zero_bubble_seconds"
        for p, chunk_list in enumerate(self.stages.rank_stages):
            busy = pulp.lpSum(self.stage_s[c] for c in chunk_list)
            prob += Mr >= busy, f"rank{p}_within_max_rank_seconds"

    def _add_tail_rows(self) -> None:
        costs, tail = self.costs, self.tail_seconds
        # [Constraint] step tail: optimizer + exposed end-of-step ZeRO traffic, slowest rank
        #   original: tail = max_p (opt_p + exposed_p + max(0, overlapped_p - backward_p))
        for p, chunk_list in enumerate(self.stages.rank_stages):
            params = self.rank_params(p)
            per_param = costs.optimizer_seconds_per_param + costs.zero_exposed_end_seconds_per_param
            base = per_param * params
            overlapped = costs.zero_overlapped_seconds_per_param * params
            self.prob += tail >= base, f"rank{p}_tail_seconds"
            backward = pulp.lpSum(self.backward_s[c] for c in chunk_list)
            self.prob += tail >= base + overlapped - backward, f"rank{p}_tail_after_overlap"

    # ---------------------------------------------------------------------- objective
    def _set_objective(self) -> None:
        """The step time (planner/schedules.py's latency formula + the tail); for "gpu" and
        "host" the peak to minimise, with the step time as a tie-breaker."""
        lay = self.costs.layout
        step = pipeline_step(
            lay.pp_schedule,
            lay.pp,
            lay.num_microbatches,
            stage_sum=pulp.lpSum(self.stage_s.values()),
            stage_max=self.max_stage_seconds,
            rank_max=self.max_rank_seconds,
            residue_max=self.max_zero_bubble_seconds,
        )
        step = step + self.tail_seconds
        if self.peak_gib is not None:
            self.prob += self.peak_gib + 1e-6 * step
        elif self.host_peak_gib is not None:
            self.prob += self.host_peak_gib + 1e-6 * step
        else:
            self.prob += step

    def solve(
        self, solver: str, time_limit: float, gap: float, cutoff: float | None, relaxed: bool
    ) -> Solved:
        """One bounded solve of the problem as it stands (relaxed: the LP relaxation)."""
        began = time.perf_counter()
        limit = max(time_limit, 0.01)
        self.prob.solve(_solver(solver, limit, gap, None if relaxed else cutoff, mip=not relaxed))
        status = pulp.LpStatus[self.prob.status]
        solution = pulp.LpSolution[self.prob.sol_status]
        # HiGHS names why it stopped (PuLP folds "Time limit reached" and "Objective bound"
        # into one status); CBC: a solution short of optimal means the time limit
        if solver == "HiGHS":
            model = self.prob.solverModel
            time_limited = model.modelStatusToString(model.getModelStatus()) == "Time limit reached"
        else:
            time_limited = status == "Not Solved" or solution == "Solution Found"
        return Solved(status, solution, time.perf_counter() - began, time_limited)

    def read(self, solved: Solved, cutoff: float | None, relaxed: bool) -> MilpResult:
        """The MilpResult of a solve: per-stage choices and the objective (bytes for "gpu"
        and "host"); none below `cutoff` reads as cut off."""
        seconds, time_limited = solved.seconds, solved.time_limited
        objective = float(pulp.value(self.prob.objective)) if solved.found else float("inf")
        if not solved.found or (cutoff is not None and objective >= cutoff):
            names = CUT_OFF if cutoff is not None else (solved.status, solved.solution)
            return MilpResult(*names, float("inf"), seconds, time_limited=time_limited)

        def value(var: pulp.LpVariable) -> float:
            return float(var.varValue or 0.0)

        choices = tuple(
            StageChoice(
                layers={
                    m: value(var) if relaxed else round(value(var))
                    for m, var in self.mode_layers[c].items()
                },
                offload_sum={m: value(self.offload_sum[c][m]) for m in SPLIT_MODES},
                recompute_sum={m: value(self.recompute_sum[c][m]) for m in SPLIT_MODES},
                anchor_offload_sum={
                    m: value(self.anchor_offload_sum[c][m]) for m in RECOMPUTE_MODES
                },
            )
            for c in range(self.num_stages)
        )
        if self.objective in ("gpu", "host"):
            objective *= UNIT
        return MilpResult(solved.status, solved.solution, objective, seconds, choices, time_limited)

    def solve_and_read(
        self, solver: str, time_limit: float, gap: float, cutoff: float | None, relaxed: bool
    ) -> MilpResult:
        return self.read(self.solve(solver, time_limit, gap, cutoff, relaxed), cutoff, relaxed)

    def fix_split(self, split: list[int] | None) -> None:
        """Fix N[c] = split[c] (None: free them again, 1..L-S+1)."""
        for c, var in self.stage_layers.items():
            if split is None:
                var.lowBound, var.upBound = 1, self.most
            else:
                var.lowBound = var.upBound = split[c]


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
    if costs.on_demand:  # its rows bound prefetching layouts (planner/baselines.py has these)
        raise ValueError("the MILP models layout.activation_fetch='prefetch' only")
    started = time.perf_counter()
    milp = LayoutMilp(costs, stages, num_layers, objective, floors)
    if not milp.largest_coefficient() <= LARGEST_COEFFICIENT:  # also NaN: out of range
        return MilpResult(*OUT_OF_RANGE, float("inf"), time.perf_counter() - started)

    def left() -> float:
        return time_limit - (time.perf_counter() - started)

    # A pipeline's hard part is the integer layer split. First a quick incumbent: the LP
    # relaxation's split rounded (largest remainders), policies solved for that split; then
    # the full MILP only has to beat it (a cutoff), within what is left of the time limit.
    heuristic = None
    if milp.num_stages > 1 and objective == "time":
        relaxation = milp.solve_and_read(solver, time_limit, gap, None, relaxed=True)
        if not relaxation.found:  # the relaxation is infeasible: so is the MILP
            return dataclasses.replace(relaxation, seconds=time.perf_counter() - started)
        if cutoff is not None and relaxation.objective >= cutoff:  # a lower bound already
            return MilpResult(*CUT_OFF, float("inf"), time.perf_counter() - started)
        fractional = [var.varValue or 1.0 for var in milp.stage_layers.values()]
        milp.fix_split(round_split(fractional, num_layers))
        heuristic = milp.solve_and_read(solver, left(), gap, cutoff, relaxed=False)
        milp.fix_split(None)
    cut = cutoff
    if heuristic is not None and heuristic.found:
        cut = heuristic.objective if cut is None else min(cut, heuristic.objective)
    full = milp.solve_and_read(solver, left(), gap, cut, relaxed=False)
    seconds = time.perf_counter() - started
    if full.found or heuristic is None or not heuristic.found:
        return dataclasses.replace(full, seconds=seconds)
    # nothing beats the heuristic: it is the optimum unless the full solve ran out of time
    proven = "Solution Found" if full.time_limited else "Optimal Solution Found"
    return dataclasses.replace(
        heuristic, solution_status=proven, seconds=seconds, time_limited=full.time_limited
    )
