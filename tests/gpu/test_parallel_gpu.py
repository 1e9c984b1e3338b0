"""The parallel runtime on CUDA (NCCL, bf16 FSDP2 mixed precision, DeepSpeed bf16), through
`memplan train` as a user runs it. Skipped without CUDA; layouts needing more GPUs than
this machine has are skipped one by one.

Each run prints its last metrics line (step time and peak memory for BENCHMARKS.md).
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.distributed.layout_worker import reference
from tests.distributed.layouts import Case, _pp, memplan_train, printed_losses

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

STEPS = 20
GPU_OVERRIDES = (
    "cluster.device=cuda",
    "train.dtype=bf16",
    "train.seq_len=256",
    "train.global_batch_size=8",
    f"train.steps={STEPS}",
    "train.warmup_steps=2",
)

GPU_CASES = [
    Case("dp1_zero3_fsdp2", 1, {"zero_stage": 3}, GPU_OVERRIDES, micro_batch_size=4),
    Case("dp1_zero2_deepspeed", 1, {"zero_stage": 2, "zero_backend": "deepspeed"},
         GPU_OVERRIDES, micro_batch_size=4),
    Case("dp2_zero3_fsdp2", 2, {"dp": 2, "zero_stage": 3}, GPU_OVERRIDES),
    Case("dp2_zero1_deepspeed", 2, {"dp": 2, "zero_stage": 1, "zero_backend": "deepspeed"},
         GPU_OVERRIDES),
    Case("pp2_zbv_zero_bubble", 2, _pp("zbv_zero_bubble", 2), GPU_OVERRIDES, micro_batch_size=2),
    Case("tp2_sp2_zero3", 4, {"tp": 2, "sp": 2, "zero_stage": 3}, GPU_OVERRIDES,
         micro_batch_size=4),
]  # fmt: skip


@pytest.mark.parametrize("case", GPU_CASES, ids=[c.name for c in GPU_CASES])
def test_layout_trains_in_bf16_like_fp32(case: Case, tmp_path) -> None:
    if torch.cuda.device_count() < case.world:
        pytest.skip(f"needs {case.world} GPUs, found {torch.cuda.device_count()}")
    plan = tmp_path / "plan.json"
    case.plan().write(plan)
    done = memplan_train(case, plan, tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    losses = printed_losses(output)
    assert sorted(losses) == list(range(1, STEPS + 1)), output[-4000:]
    assert all(math.isfinite(loss) for loss in losses.values())
    assert losses[STEPS] < 0.9 * losses[1], losses
    # bf16 compute against the fp32 single-process run on the CPU: the first loss agrees
    # to bf16 precision (same weights and data)
    fp32 = reference(case.config())[0]
    assert losses[1] == pytest.approx(fp32[0], rel=2e-2)
    print(f"{case.name}: {[line for line in output.splitlines() if 'step ' in line][-1]}")
