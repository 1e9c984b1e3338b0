"""Plan-search speed against model depth and layout candidates:
`python bench/plan_speed.py [--quick]`.

1. For llama3_70b widths with 8..128 layers on h100_64x (seq 8192, 256 sequences per step):
   the full layout search (wall time, layouts enumerated, MILPs solved, status), and single
   MILP solves of fixed layouts (pp = 1, pp = 8 with 1F1B, pp = 8 interleaved with 2 stages
   per rank) to show how one solve grows with the number of layers.
2. For llama3_70b (80 layers) on 1..32 nodes of 8 H100s: the number of layout candidates
   the search enumerates grows with the GPU count; search time against it.
Prints two tables; exit 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from launch.compose import compose_config
from planner.errors import NoFeasiblePlan
from planner.make import make_plan
from planner.milp import solver_name
from planner.plan import Layout
from planner.search import Candidate

BASE = [
    "model=llama3_70b",
    "cluster=h100_64x",
    "train.seq_len=8192",
    "train.global_batch_size=256",
]
FIXED = {
    "pp1": dict(dp=8, tp=8, pp=1, sp=1, zero_stage=3, micro_batch_size=2, num_microbatches=16,
                pp_schedule="none"),
    "pp8 1f1b": dict(dp=1, tp=8, pp=8, sp=1, zero_stage=3, micro_batch_size=2,
                     num_microbatches=128, pp_schedule="1f1b"),
    "pp8 interleaved v2": dict(dp=1, tp=8, pp=8, sp=1, zero_stage=3, micro_batch_size=2,
                               num_microbatches=128, pp_schedule="interleaved_1f1b",
                               virtual_stages=2),
}  # fmt: skip


def fixed_solve_seconds(cfg, fields: dict) -> tuple[float, str]:
    """Seconds and status of one MILP solve of a fixed layout, as the search solves it."""
    cand = Candidate.of(cfg, Layout(zero_backend="fsdp2", **fields))
    solver, p = solver_name(cfg.planner.solver), cfg.planner
    started = time.perf_counter()
    result = cand.solve(cfg.model.num_layers, solver, p.solve_time_limit_seconds, p.mip_gap)
    return time.perf_counter() - started, result.solution_status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8, 32 and 128 layers only")
    args = parser.parse_args()
    depths = [8, 32, 128] if args.quick else [8, 16, 32, 64, 80, 128]
    header = (
        f"{'layers':>6} | {'search s':>8} | {'cpu s':>6} | {'layouts':>7} | {'MILPs':>5} | "
        f"{'status':<21} | " + " | ".join(f"{name:>20}" for name in FIXED)
    )
    print("llama3_70b widths on h100_64x, seq 8192 x 256 sequences; HiGHS via PuLP")
    print("fixed-layout columns: one MILP solve (with the search's bound cuts), seconds (status)")
    print(f"load average before: {os.getloadavg()[0]:.1f} (wall times scale with it)")
    print(header)
    print("-" * len(header))
    for layers in depths:
        cfg = compose_config([*BASE, f"model.num_layers={layers}"])
        started, cpu = time.perf_counter(), time.process_time()
        plan = make_plan(cfg)
        search_s = time.perf_counter() - started
        search_cpu = time.process_time() - cpu
        cells = []
        for fields in FIXED.values():
            if fields["pp"] * fields.get("virtual_stages", 1) > layers:
                cells.append(f"{'-':>20}")
                continue
            seconds, status = fixed_solve_seconds(cfg, fields)
            short = "optimal" if status == "Optimal Solution Found" else status
            cells.append(f"{seconds:>8.3f} ({short[:9]:>9})")
        s = plan.solver
        print(
            f"{layers:>6} | {search_s:>8.2f} | {search_cpu:>6.2f} | {s.layouts_considered:>7} | "
            f"{s.candidates_evaluated:>5} | {s.status:<21} | " + " | ".join(cells)
        )
    print("\nllama3_70b (80 layers) on N nodes of 8 H100s: search time against layout candidates")
    header = (
        f"{'GPUs':>5} | {'layouts':>7} | {'MILPs':>5} | {'search s':>8} | {'cpu s':>6} | "
        f"{'status':<21} | layout chosen"
    )
    print(header)
    print("-" * len(header))
    for nodes in [1, 2, 4, 8, 16] if args.quick else [1, 2, 4, 8, 16, 32]:
        cfg = compose_config([*BASE, f"cluster.num_nodes={nodes}"])
        started, cpu = time.perf_counter(), time.process_time()
        try:
            plan = make_plan(cfg)
        except NoFeasiblePlan:
            print(f"{nodes * 8:>5} | no feasible plan")
            continue
        search_s, search_cpu = time.perf_counter() - started, time.process_time() - cpu
        s, lay = plan.solver, plan.layout
        chosen = f"dp{lay.dp} tp{lay.tp} pp{lay.pp} sp{lay.sp} zero{lay.zero_stage}"
        print(
            f"{nodes * 8:>5} | {s.layouts_considered:>7} | {s.candidates_evaluated:>5} | "
            f"{search_s:>8.2f} | {search_cpu:>6.2f} | {s.status:<21} | {chosen}"
        )
    cfg = compose_config(BASE)
    print(f"\ndefault planner settings: {dataclasses.asdict(cfg.planner)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
