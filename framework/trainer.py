"""The train loop. Everything it calls lives elsewhere; the loop itself stays short.

resume (newest valid checkpoint) -> data (TokenLoader) -> runtime.train_step (layout,
micro-batches, optimizer) -> metrics line on logging steps (the only device syncs) -> wandb
-> validation loss every train.eval_every steps (and before the first) -> asynchronous
checkpoint on checkpoint steps, or after the step at which a SIGUSR1 arrived (then the loop
stops: framework/components/stop.py)
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from configs.schema import Config
from configs.structured import to_plain
from framework.components.checkpoint import Checkpointer
from framework.components.data import TokenLoader, open_tokens
from framework.components.device import resolve_device, resolve_dtype
from framework.components.distributed import init_distributed
from framework.components.evaluation import ValidationSet, open_validation_tokens
from framework.components.logs import log_rank0
from framework.components.metrics import MetricsTracker, header_summary
from framework.components.stop import StopRequest
from framework.components.tracking import WandbTracker
from framework.runtime import TrainRuntime, build_runtime
from planner.plan import Plan
from planner.units import GIB

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """Losses of the logged steps, by step number."""

    losses: dict[int, float] = field(default_factory=dict)
    eval_losses: dict[int, float] = field(default_factory=dict)
    """Validation losses by the step they follow (0: before the first step)."""
    start_step: int = 0
    """Steps already done by the checkpoint this run resumed from (0: a fresh start)."""
    stopped_at: int | None = None
    """The step after which a signal (SIGUSR1) stopped the run, with a checkpoint."""
    stop_signal: str = ""
    """That signal's name."""
    last_committed: int | None = None
    """The newest checkpoint step this run committed."""


def train(cfg: Config, plan: Plan, run_dir: Path) -> TrainResult:
    """Run cfg.train.steps optimizer steps of the planned layout; returns the logged losses."""
    device = resolve_device(cfg.cluster)
    dtype = resolve_dtype(cfg.train, device)
    dist_ctx = init_distributed(device)
    torch.manual_seed(cfg.train.seed)
    runtime = build_runtime(cfg.model, cfg.train, plan, device, dtype, dist_ctx)
    loader = TokenLoader(
        open_tokens(cfg.data),
        cfg.train.seq_len,
        cfg.train.global_batch_size,
        cfg.train.seed,
        cfg.model.vocab_size,
        runtime.dp_rank,
        runtime.dp_size,
    )
    validation = None
    if cfg.train.eval_every > 0:
        val_tokens = open_validation_tokens(cfg.data)
        validation = ValidationSet(val_tokens, cfg.train.seq_len, cfg.model.vocab_size)
    tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
    metrics = MetricsTracker(
        cfg.model,
        cfg.train.seq_len,
        tokens_per_step,
        dist_ctx.world_size,
        cfg.cluster.peak_tflops,
        cfg.cluster.gpu_memory_gib * GIB,
        device,
    )
    tracker = WandbTracker(
        cfg.logging if dist_ctx.rank == 0 else replace(cfg.logging, wandb=False),
        run_dir,
        run_dir.name,
        to_plain(cfg),
    )
    layout = plan.layout
    # 16 sequences x 256 tokens = 4,096 tokens per step on the demo
    log_rank0(
        logger,
        f"training {plan.model.name} ({plan.model.num_params:,} params) on {device.type}: "
        f"dp={layout.dp} tp={layout.tp} pp={layout.pp} sp={layout.sp} zero={layout.zero_stage}"
        f" | {cfg.train.global_batch_size} seq x {cfg.train.seq_len} tokens = "
        f"{tokens_per_step:,} tokens/step ({layout.num_microbatches} micro-batches of "
        f"{layout.micro_batch_size}) | {cfg.train.steps} steps",
    )
    log_rank0(logger, header_summary(plan, metrics))
    checkpointer = build_checkpointer(cfg, plan, run_dir, runtime, device)
    stop = StopRequest()  # after the checkpointer: every rank creates the groups in one order
    result = TrainResult()
    # A snapshot overlaps the next forward/backward: the runtime calls this hook right
    # before its optimizer step writes the state the snapshot is still reading.
    runtime.pre_update_hooks.append(checkpointer.before_update)
    try:
        result.start_step = resume(cfg, checkpointer, loader)
        last_step = cfg.train.steps
        if cfg.checkpoint.exit_after:
            last_step = min(last_step, result.start_step + cfg.checkpoint.exit_after)
        if validation is not None:
            evaluate(runtime, validation, result.start_step, tracker, result)
        metrics.start_window()  # set-up above (wandb, resume, eval) is not throughput
        for step in range(result.start_step + 1, last_step + 1):
            inputs, targets = loader.next_batch()
            output = runtime.train_step(inputs, targets)
            metrics.step_done()
            logged = (
                step in (1, result.start_step + 1)
                or step % cfg.logging.every == 0
                or step == last_step
            )
            if logged:
                line = metrics.collect(step, output.loss, output.grad_norm)  # host sync
                log_rank0(logger, line.line())
                tracker.log(line)
                result.losses[step] = line.loss
            if validation is not None and step % cfg.train.eval_every == 0:
                if device.type == "cuda":  # the step's own kernels finish in its window
                    torch.cuda.synchronize(device)
                started = time.perf_counter()
                evaluate(runtime, validation, step, tracker, result)  # ends in a host sync
                metrics.exclude(time.perf_counter() - started)  # not training throughput
            stopping = stop.agreed()  # host-to-host, every step: all ranks stop together
            if checkpointer.due(step, last_step) or stopping:
                checkpointer.save(step, {"loader": loader.state_dict()})
            if stopping:
                result.stopped_at, result.stop_signal = step, stop.name
                log_rank0(logger, f"{stop.name}: stopping after step {step}, with a checkpoint")
                break
        checkpointer.finish()  # the last checkpoint is committed before train() returns
        result.last_committed = checkpointer.last_committed
    finally:
        stop.close()
        runtime.pre_update_hooks.remove(checkpointer.before_update)
        checkpointer.close()
        tracker.finish()
        runtime.close()
    return result


def evaluate(
    runtime: TrainRuntime,
    validation: ValidationSet,
    step: int,
    tracker: WandbTracker,
    result: TrainResult,
) -> None:
    """The validation loss after `step` steps: printed by rank 0 (`eval N | loss X.XXXX`),
    logged to wandb as eval/loss, kept in result.eval_losses."""
    sums = runtime.evaluate(validation)  # host sync
    if sums.tokens != validation.num_tokens:  # every window counted exactly once
        raise RuntimeError(
            f"validation counted {sums.tokens} tokens, not the file's {validation.num_tokens}"
        )
    log_rank0(logger, f"eval {step} | loss {sums.loss:.4f}")
    tracker.log_eval(step, sums.loss)
    result.eval_losses[step] = sums.loss


def build_checkpointer(
    cfg: Config, plan: Plan, run_dir: Path, runtime: TrainRuntime, device: torch.device
) -> Checkpointer:
    """Checkpoints of this run in checkpoint.dir (default <run dir>/checkpoints), each with
    the plan and the resolved config that produced it."""
    root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"
    run_files = {
        "plan.json": plan.to_json().encode(),
        "config.json": json.dumps(to_plain(cfg), indent=1).encode(),
    }
    return Checkpointer(cfg.checkpoint, root, runtime.stateful_parts(), device, run_files)


def resume(cfg: Config, checkpointer: Checkpointer, loader: TokenLoader) -> int:
    """Continue from the newest valid checkpoint (checkpoint.resume=auto); the steps done."""
    if cfg.checkpoint.resume == "none":
        return 0
    resumed = checkpointer.resume()
    if resumed is None:
        return 0
    loader.load_state_dict(resumed.train_state["loader"])
    return resumed.step
