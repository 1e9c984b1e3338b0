"""torchrun worker for tests/distributed: train every case with the parallel runtime and
compare it with one process.

    python -m torch.distributed.run --nproc-per-node=N tests/distributed/layout_worker.py \
        CASES_DIR OUT_JSON

CASES_DIR holds one directory per case with resolved.yaml and plan.json (what `memplan
train` writes). One process group serves every case, so torchrun starts once per world size.
For each case, rank 0 records the losses and gradient norms of both runs and, over all
ranks, the largest difference between the final parameters (read through the runtime's
checkpointable model state, so FQN keys and the tied-embedding copy are checked too).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from configs.schema import Config
from framework.components.data import TokenLoader, open_tokens
from framework.components.distributed import DistContext
from framework.components.evaluation import ValidationSet, open_validation_tokens
from framework.components.model import build_model, materialize
from framework.runtime import LocalRuntime, TrainRuntime, build_runtime
from launch.compose import load_resolved
from planner.plan import Plan

Reference = tuple[list[float], list[float], dict[str, torch.Tensor], float, list[float]]


def loader_for(cfg: Config, dp_rank: int, dp_size: int) -> TokenLoader:
    return TokenLoader(
        open_tokens(cfg.data),
        cfg.train.seq_len,
        cfg.train.global_batch_size,
        cfg.train.seed,
        cfg.model.vocab_size,
        dp_rank,
        dp_size,
    )


def validation_for(cfg: Config) -> ValidationSet | None:
    """The validation windows when the case evaluates (train.eval_every > 0)."""
    if cfg.train.eval_every == 0:
        return None
    return ValidationSet(open_validation_tokens(cfg.data), cfg.train.seq_len, cfg.model.vocab_size)


def train_steps(
    cfg: Config, runtime: TrainRuntime, loader: TokenLoader
) -> tuple[list[float], list[float], list[float]]:
    """cfg.train.steps steps: losses, grad norms, and the validation losses before the first
    step and after every train.eval_every steps (as the trainer evaluates)."""
    validation = validation_for(cfg)
    losses, norms, evals = [], [], []
    for step in range(cfg.train.steps + 1):
        if step:
            out = runtime.train_step(*loader.next_batch())
            losses.append(float(out.loss))
            norms.append(float(out.grad_norm))
        if validation is not None and step % cfg.train.eval_every == 0:
            evals.append(runtime.evaluate(validation).loss)
    return losses, norms, evals


def reference(cfg: Config) -> Reference:
    """One process, the whole batch in one micro-batch: losses, grad norms, final parameters,
    the largest change of any parameter entry (what a wrong layout would miss) and the
    validation losses (when the case evaluates)."""
    model = materialize(build_model(cfg.model), "cpu", cfg.train.seed)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    runtime = LocalRuntime(
        model, cfg.train, cfg.train.global_batch_size, torch.device("cpu"), torch.float32
    )
    losses, norms, evals = train_steps(cfg, runtime, loader_for(cfg, 0, 1))
    final = {k: v.detach().clone() for k, v in model.state_dict().items()}
    update = max(float((final[k] - initial[k]).abs().max()) for k in final)
    return losses, norms, final, update, evals


def run_case(case: Path, ctx: DistContext, references: dict[str, Reference]) -> dict:
    cfg = load_resolved(str(case / "resolved.yaml"))
    plan = Plan.read(case / "plan.json")
    ref_losses, ref_norms, ref_params, ref_update, ref_evals = reference_for(cfg, references)

    start = time.perf_counter()
    runtime = build_runtime(cfg.model, cfg.train, plan, torch.device("cpu"), torch.float32, ctx)
    loader = loader_for(cfg, runtime.dp_rank, runtime.dp_size)
    losses, norms, evals = train_steps(cfg, runtime, loader)

    # Largest |parallel - single| over the parameters this rank holds, then over ranks.
    state = runtime.stateful_parts()["model"].state_dict()
    worst = torch.zeros(2)  # [max abs diff, number of missing or extra keys]
    seen = set()
    for name, value in sorted(state.items()):
        full = value.full_tensor() if isinstance(value, DTensor) else value
        if name not in ref_params:
            worst[1] += 1
            continue
        seen.add(name)
        diff = (full.detach().float().cpu() - ref_params[name]).abs().max()
        worst[0] = torch.maximum(worst[0], diff)
    # layers handed to the offload engine, over all ranks (each layer once per replica)
    engines = torch.tensor([len(runtime.activation_runtime.engines)])
    dist.all_reduce(engines)
    seen_all: list[set[str]] = [set() for _ in range(ctx.world_size)]
    dist.all_gather_object(seen_all, seen)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    runtime.close()
    missing = sorted(set(ref_params) - set().union(*seen_all))
    return {
        "losses": losses,
        "ref_losses": ref_losses,
        "grad_norms": norms,
        "ref_grad_norms": ref_norms,
        "max_param_diff": float(worst[0]),
        "ref_max_update": ref_update,
        "unknown_keys": int(worst[1]),
        "missing_keys": missing,
        "activation_engines": int(engines),
        "eval_losses": evals,
        "ref_eval_losses": ref_evals,
        "seconds": time.perf_counter() - start,
    }


def run_resume_case(case: Path, ctx: DistContext, references: dict[str, Reference]) -> dict:
    """Train case/first until its checkpoint.exit_after, then case/second from that
    checkpoint, both through the trainer's own loop (framework.trainer.train)."""
    from framework.trainer import train

    first_cfg = load_resolved(str(case / "first" / "resolved.yaml"))
    train(first_cfg, Plan.read(case / "first" / "plan.json"), case / "first")
    cfg = load_resolved(str(case / "second" / "resolved.yaml"))
    result = train(cfg, Plan.read(case / "second" / "plan.json"), case / "second")
    ref_losses = reference_for(cfg, references)[0]
    return {
        "start_step": result.start_step,
        "losses": [result.losses[step] for step in sorted(result.losses)],
        "steps": sorted(result.losses),
        "ref_losses": ref_losses[result.start_step :],
    }


def reference_for(cfg: Config, references: dict[str, Reference]) -> Reference:
    """The single-process run of cfg's model and batch (cached: every case of a config)."""
    key = json.dumps([cfg.model.__dict__, cfg.train.__dict__], sort_keys=True, default=str)
    if key not in references:
        references[key] = reference(cfg)
    return references[key]


def main(cases_dir: Path, out: Path) -> int:
    # full_tensor() of FSDP x TP parameters warns about its two all-gathers: expected here
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    dist.init_process_group("gloo", timeout=timedelta(seconds=180))
    ctx = DistContext(dist.get_rank(), dist.get_world_size(), dist.get_rank())
    results, references = {}, {}
    try:
        for case in sorted(p for p in cases_dir.iterdir() if p.is_dir()):
            if (case / "first").is_dir():
                results[case.name] = run_resume_case(case, ctx, references)
            else:
                results[case.name] = run_case(case, ctx, references)
            if ctx.rank == 0:
                r = results[case.name]
                pairs = zip(r["losses"], r["ref_losses"], strict=True)
                diff = max((abs(a - b) for a, b in pairs), default=float("nan"))
                print(f"{case.name}: loss diff {diff:.3g}", flush=True)
                out.write_text(json.dumps(results, indent=1))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
