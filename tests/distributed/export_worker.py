"""torchrun worker: train a plan with memplan's DeepSpeed runtime, then the same model with
plain deepspeed.initialize driven by the config `memplan export` wrote, as a user's script
would (model, torch AdamW and schedule passed in; forward, engine.backward, engine.step per
micro-batch); rank 0 writes both runs' losses.

    python -m torch.distributed.run --nproc-per-node=2 tests/distributed/export_worker.py \
        RUN_DIR OUT_JSON

RUN_DIR holds resolved.yaml, plan.json and ds_config.json (the exported file).
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # said, not detected (PLATFORM.md)

import torch
import torch.distributed as dist

from framework.components.distributed import DistContext
from framework.components.optim import build_lr_scheduler, build_optimizer
from framework.runtime import build_runtime
from framework.runtime.deepspeed_backend import LossModule, restore_torch_linear
from launch.compose import load_resolved
from parallel.stage_model import StageModel
from planner.plan import Plan
from tests.distributed.layout_worker import loader_for


def memplan_losses(cfg, plan: Plan, ctx: DistContext) -> list[float]:
    runtime = build_runtime(cfg.model, cfg.train, plan, torch.device("cpu"), torch.float32, ctx)
    loader = loader_for(cfg, runtime.dp_rank, runtime.dp_size)
    losses = [float(runtime.train_step(*loader.next_batch()).loss) for _ in range(cfg.train.steps)]
    runtime.close()
    return losses


def exported_losses(cfg, ds_config: dict) -> list[float]:
    """A user's DeepSpeed loop on the exported config."""
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no op to compile on CPU
    restore_torch_linear()
    model = StageModel(cfg.model, loss_chunk_tokens=cfg.train.loss_chunk_tokens)
    model.init_weights(cfg.train.seed)
    optimizer = build_optimizer([model], cfg.train, torch.device("cpu"))
    scheduler = build_lr_scheduler(optimizer, cfg.train)
    engine, _, _, _ = deepspeed.initialize(
        model=LossModule(model), optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    micro = engine.train_micro_batch_size_per_gpu()
    loader = loader_for(cfg, dist.get_rank(), dist.get_world_size())
    losses = []
    for _ in range(cfg.train.steps):
        inputs, targets = loader.next_batch()
        total = torch.zeros(())
        for start in range(0, inputs.shape[0], micro):
            loss = engine(inputs[start : start + micro], targets[start : start + micro])
            engine.backward(loss)
            engine.step()  # an optimizer step at the accumulation boundary only
            total += loss.detach()
        total /= inputs.shape[0] // micro
        dist.all_reduce(total)
        losses.append(float(total) / dist.get_world_size())
    engine.destroy()
    return losses


def main(run_dir: Path, out: Path) -> int:
    dist.init_process_group("gloo", timeout=timedelta(seconds=180))
    ctx = DistContext(dist.get_rank(), dist.get_world_size(), dist.get_rank())
    try:
        cfg = load_resolved(str(run_dir / "resolved.yaml"))
        plan = Plan.read(run_dir / "plan.json")
        ds_config = json.loads((run_dir / "ds_config.json").read_text())
        ours = memplan_losses(cfg, plan, ctx)
        theirs = exported_losses(cfg, ds_config)
        if ctx.rank == 0:
            out.write_text(json.dumps({"memplan": ours, "exported": theirs}))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
