"""The validation loss is the one-process value under every kind of layout (relative 1e-5,
fp32), before the first step and after each, and evaluating leaves training as it was: the
training losses still match one process, and those of two pipelines and a ZeRO-2 run are
bitwise those of the same layout without eval.

One torchrun of two ranks runs every case (tests/distributed/layout_worker.py): the
validation file has 7 windows, so that dp ranks get unequal shares and the last
micro-batch (or pipeline call) of a rank is part padding.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from framework.components.data import stdlib_corpus
from tests.distributed.layouts import Case, run_worker

pytestmark = pytest.mark.distributed

RTOL = 1e-5
STEPS = 2
WINDOWS = 7
SEQ = 64  # tests/distributed/layouts.BASE_OVERRIDES: train.seq_len=64


def _pp(schedule: str, virtual: int = 1, zero_stage: int = 0) -> dict[str, object]:
    return {"pp": 2, "pp_schedule": schedule, "virtual_stages": virtual, "zero_stage": zero_stage}


# name, layout, micro_batch_size (8 sequences per step)
LAYOUTS = [
    ("dp2_zero3", {"dp": 2, "zero_stage": 3}, None),
    ("dp2_zero2", {"dp": 2, "zero_stage": 2}, None),
    ("dp2_zero1", {"dp": 2, "zero_stage": 1}, None),
    ("dp2_zero3_deepspeed", {"dp": 2, "zero_stage": 3, "zero_backend": "deepspeed"}, None),
    ("tp2", {"tp": 2}, 4),
    ("sp2", {"sp": 2}, 4),
    ("pp2_1f1b", _pp("1f1b"), 2),
    ("pp2_interleaved_1f1b", _pp("interleaved_1f1b", 2), 2),
    # V-shaped stages (parallel.pipeline.ForwardOnlyStage) under FSDP
    ("pp2_zbv_zero_bubble_zero3", _pp("zbv_zero_bubble", 2, zero_stage=3), 2),
]
WITHOUT_EVAL = ("pp2_1f1b", "pp2_zbv_zero_bubble_zero3", "dp2_zero2")
"""Also run without eval: their training losses must be bitwise the same."""


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[dict, str]:
    root = tmp_path_factory.mktemp("eval")
    val_path = root / "val.bin"
    # Python source like the training corpus, 7 whole windows and a partial one
    stdlib_corpus(1 << 16)[: WINDOWS * (SEQ + 1) + 10].astype(np.uint16).tofile(val_path)
    common = (f"train.steps={STEPS}", "train.warmup_steps=1")
    evaluating = (*common, f"data.val_path={val_path}", "train.eval_every=1")
    cases = [
        Case(name, 2, layout, evaluating, micro_batch_size=micro) for name, layout, micro in LAYOUTS
    ]
    cases += [
        dataclasses.replace(case, name=f"{case.name}_noeval", overrides=common)
        for case in cases
        if case.name in WITHOUT_EVAL
    ]
    return run_worker(cases, 2, root / "runs")


@pytest.mark.parametrize("name", [name for name, _, _ in LAYOUTS])
def test_eval_loss_is_the_one_process_loss(results, name):
    found, log = results
    assert name in found, f"{name} did not finish; torchrun output:\n{log}"
    result = found[name]
    assert len(result["eval_losses"]) == STEPS + 1  # step 0, then after every step
    assert len(result["ref_eval_losses"]) == STEPS + 1
    for step, (got, want) in enumerate(
        zip(result["eval_losses"], result["ref_eval_losses"], strict=True)
    ):
        assert got == pytest.approx(want, rel=RTOL), f"eval {step}: {got!r} vs {want!r}"
    # training went on as in one process, and the eval loss moved with it
    for got, want in zip(result["losses"], result["ref_losses"], strict=True):
        assert got == pytest.approx(want, rel=RTOL)
    assert result["eval_losses"][-1] < result["eval_losses"][0]


@pytest.mark.parametrize("name", WITHOUT_EVAL)
def test_eval_leaves_training_bitwise_unchanged(results, name):
    found, log = results
    assert name in found and f"{name}_noeval" in found, log
    assert found[name]["losses"] == found[f"{name}_noeval"]["losses"]
    assert found[name]["grad_norms"] == found[f"{name}_noeval"]["grad_norms"]
    assert not found[f"{name}_noeval"]["eval_losses"]
