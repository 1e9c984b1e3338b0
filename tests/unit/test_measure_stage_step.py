"""framework/measure/stage_step.py: the step a measurement times is the runtime's step
(framework/runtime/step.py), on a whole model or on a pipeline stage built here."""

import dataclasses

import pytest
import torch

from framework.components.model import build_model, materialize
from framework.measure.profile import profile_setup, run_profile
from framework.measure.setup import build_stage_model, whole_model_setup
from framework.measure.stage_step import StageStep, stage_batch
from framework.runtime import LocalRuntime
from launch.compose import compose_config
from planner.plan import LayerPlan
from tests.plans import manual_plan

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(*overrides):
    return compose_config(
        ["model.num_layers=2", "train.seq_len=32", "train.global_batch_size=4", *overrides]
    )


def test_a_whole_model_steps_exactly_as_local_runtime_does():
    cfg = _cfg()
    setup = whole_model_setup(cfg, torch.float32, micro_batch=2)
    step = StageStep(build_stage_model(setup, CPU, 0), setup, CPU)
    model = materialize(build_model(cfg.model), CPU, 0)
    runtime = LocalRuntime(model, cfg.train, 2, CPU, torch.float32)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (4, 33), generator=generator)
    for _ in range(3):  # two micro-batches per step, clipping, AdamW, the LR schedule
        mine = step.train_step(tokens[:, :-1], tokens[:, 1:])
        reference = runtime.train_step(tokens[:, :-1], tokens[:, 1:])
        assert torch.equal(mine.loss, reference.loss)
        assert torch.allclose(mine.grad_norm, reference.grad_norm, rtol=1e-6)
    mine_params = dict(step.model.named_parameters())
    for name, param in runtime.model.named_parameters():
        assert torch.allclose(mine_params[name], param, rtol=1e-5, atol=1e-7), name
    assert step.grad_bytes == 4 * sum(p.numel() for p in model.parameters())


def test_a_middle_stage_starts_backward_from_its_output_gradient():
    cfg = _cfg("model.num_layers=3", "cluster.gpus_per_node=3")
    layers = [LayerPlan(i, i, 0.0, "none", 0.0) for i in range(3)]
    plan = manual_plan(cfg, layers=layers, micro_batch_size=2, pp=3)
    setup = dataclasses.replace(profile_setup(cfg, plan, CPU, "small", 16), stage=1)
    model = build_stage_model(setup, CPU, 0)
    assert not (model.is_first or model.is_last) and model.tok_embeddings is None
    inputs, targets, grad_out = stage_batch(setup, CPU, 0)
    step = StageStep(model, setup, CPU, grad_out)
    before = [p.detach().clone() for p in model.parameters()]
    out = step.train_step(inputs, targets)
    assert out.loss.item() == 0.0  # no loss on this stage
    assert out.grad_norm.item() > 0
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_measured_bytes_equal_the_prediction_on_a_middle_stage():
    cfg = _cfg("model.num_layers=3", "cluster.gpus_per_node=3")
    offload_all = (1.0, "none", 0.0, 1.0)
    mixes = [offload_all, (0.3, "none", 0.3, 0.5), offload_all]  # stage 1 is the loaded one
    layers = [LayerPlan(i, i, *mixes[i]) for i in range(3)]
    plan = manual_plan(cfg, layers=layers, micro_batch_size=2, pp=3)
    setup = profile_setup(cfg, plan, CPU, "auto", 16)
    assert setup.stage == 1 and not (setup.first_stage or setup.last_stage)
    report = run_profile(setup, plan, CPU, steps=2)
    (row,) = report.rows
    assert row.measured.device_bytes == row.predicted.device_bytes
    assert row.measured.host_bytes == row.predicted.host_bytes > 0
    assert report.peak_measured_bytes == report.peak_predicted_bytes
