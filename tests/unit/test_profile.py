"""framework/measure/profile.py: what runs for a plan (stage, per-rank widths, scaling) and that the
measured bytes of a real run equal the prediction for exactly what ran."""

import dataclasses

import pytest
import torch

from configs.errors import ConfigError
from framework.measure.profile import (
    STATE_BYTES_PER_PARAM,
    most_loaded_stage,
    per_rank_model,
    profile_setup,
    relative_error,
    run_profile,
    scale_down,
    stage_in_flight,
)
from launch.compose import compose_config
from planner.plan import LayerPlan
from tests.plans import manual_plan

CPU = torch.device("cpu")


def _cfg(*overrides):
    return compose_config(["train.seq_len=64", "train.global_batch_size=4", *overrides])


def _mixed_layers(cfg, stages=1):
    n = cfg.model.num_layers
    mixes = [
        (0.3, "none", 0.3, 0.5),
        (0.0, "selective", 0.5, 1.0),
        (0.0, "full", 0.0, 1.0),
        (0.5, "none", 0.0, 0.0),
    ]
    return [
        LayerPlan(i, i * stages // n, mixes[i % 4][0], mixes[i % 4][1], *mixes[i % 4][2:])
        for i in range(n)
    ]


def test_per_rank_model_divides_heads_and_ffn():
    model = compose_config(["model=llama3_70b"]).model
    rank = per_rank_model(model, 8)
    assert (rank.num_heads, rank.num_kv_heads, rank.ffn_size) == (8, 1, 3584)
    assert rank.hidden_size == model.hidden_size and rank.resolved_head_dim == 128
    with pytest.raises(ConfigError, match="not divisible by tp=3"):
        per_rank_model(model, 3)


def test_scale_down_keeps_the_gqa_group_and_caps_heads():
    model = compose_config(["model=llama3_70b"]).model  # 64 heads, 8 kv heads: groups of 8
    small = scale_down(model)
    assert (small.num_heads, small.num_kv_heads, small.resolved_head_dim) == (8, 1, 16)
    assert small.hidden_size == 128 and small.vocab_size == 512
    assert small.ffn_size == 448  # 28672 / 8192 x 128


def test_most_loaded_stage_counts_micro_batches_in_flight():
    cfg = compose_config(["model=llama3_8b", "cluster=h100_8x", "train.global_batch_size=8"])
    layers = _mixed_layers(cfg, stages=2)
    plan = manual_plan(cfg, layers=layers, micro_batch_size=1, pp=2, dp=4)
    assert most_loaded_stage(plan, cfg.model) == 0  # 1F1B: stage 0 holds 2 micro-batches
    # offload everything on stage 0: stage 1 (no policy) is now the most loaded
    light = [
        dataclasses.replace(p, offload_fraction=1.0, recompute="none", recompute_fraction=0.0,
                            anchor_offload_fraction=1.0) if p.stage == 0 else
        dataclasses.replace(p, offload_fraction=0.0, recompute="none", recompute_fraction=0.0,
                            anchor_offload_fraction=0.0)
        for p in layers
    ]  # fmt: skip
    plan = manual_plan(cfg, layers=light, micro_batch_size=1, pp=2, dp=4)
    assert most_loaded_stage(plan, cfg.model) == 1


def test_zbv_in_flight_counts_are_those_of_the_rank_that_runs_the_stage():
    """zbv_zero_bubble places stages in a V: rank 0 runs stages 0 and 3, rank 1 stages 1
    and 2 (planner/schedules.py); `stage % pp` would give stage 2 rank 0's count."""
    cfg = compose_config(["model=llama3_8b", "cluster=h100_8x", "train.global_batch_size=4"])
    schedule = {"pp": 2, "virtual_stages": 2, "pp_schedule": "zbv_zero_bubble"}
    plan = manual_plan(cfg, micro_batch_size=1, **schedule)
    assert [stage_in_flight(stage, plan) for stage in range(4)] == [4, 3, 2, 1]
    # stage 0 offloads everything: stage 1 (3 in flight) now outweighs stage 2 (2 in flight)
    light = dict(offload_fraction=1.0, recompute="none", recompute_fraction=0.0,
                 anchor_offload_fraction=1.0)  # fmt: skip
    layers = [dataclasses.replace(p, **light) if p.stage == 0 else p for p in plan.layers]
    plan = manual_plan(cfg, layers=layers, micro_batch_size=1, **schedule)
    assert most_loaded_stage(plan, cfg.model) == 1


def test_setup_describes_every_difference_from_the_plan():
    cfg = _cfg("model=llama3_8b", "cluster=h100_8x", "train.seq_len=4096")
    plan = manual_plan(cfg, _mixed_layers(cfg, 2), micro_batch_size=1, pp=2, tp=2, sp=2)
    setup = profile_setup(cfg, plan, CPU, "auto", 32)
    assert setup.scaled and setup.dtype == torch.float32
    assert setup.stage == 0 and setup.model.num_layers == 16
    assert setup.plan_indices == tuple(range(16))
    assert [p.index for p in setup.policies] == list(range(16))
    assert setup.seq_local == 32 and setup.micro_batch == 1
    notes = " | ".join(setup.notes)
    for expected in ("tp=2", "sp=2: 2048 local tokens", "scaled down", "stage 0 of 2"):
        assert expected in notes
    full = profile_setup(cfg, plan, CPU, "full")
    assert not full.scaled and full.model.hidden_size == 4096 and full.seq_local == 2048
    assert full.model.num_heads == 16 and full.model.ffn_size == 7168


def test_a_plan_for_another_model_is_bad_input():
    cfg = _cfg()
    plan = manual_plan(cfg)
    other = _cfg("model.num_layers=3")
    with pytest.raises(ConfigError, match="num_layers=4 but the model has 3"):
        profile_setup(other, plan, CPU)
    with pytest.raises(ConfigError, match="plan needs 1 ranks"):
        profile_setup(_cfg("cluster.gpus_per_node=2"), plan, CPU)


@pytest.mark.parametrize(
    ("pp", "stage"),
    [(1, 0), (2, 1)],  # a whole model; the last of two stages (no embedding: hidden input)
)
def test_measured_bytes_equal_the_prediction_for_what_ran(pp, stage):
    cfg = _cfg(f"cluster.gpus_per_node={pp}")
    layers = _mixed_layers(cfg, pp)
    if pp == 2:  # load the last stage so that it is the one profiled
        layers = [
            p if p.stage == 1 else dataclasses.replace(
                p, offload_fraction=1.0, recompute="none", recompute_fraction=0.0,
                anchor_offload_fraction=1.0)
            for p in layers
        ]  # fmt: skip
    plan = manual_plan(cfg, layers=layers, micro_batch_size=2, pp=pp)
    setup = profile_setup(cfg, plan, CPU, "auto", 24)
    assert setup.stage == stage
    report = run_profile(setup, plan, CPU, steps=2, baseline=True)
    assert len(report.rows) == cfg.model.num_layers // pp
    for row in report.rows:
        assert row.measured.device_bytes == row.predicted.device_bytes, row
        assert row.measured.host_bytes == row.predicted.host_bytes, row
        assert row.measured.recomputed_bytes == row.predicted.recomputed_bytes, row
    assert report.peak_measured_bytes == report.peak_predicted_bytes
    params = sum(p.numel() for p in _built_params(setup))
    assert report.state_measured_bytes == STATE_BYTES_PER_PARAM * params
    assert report.host_slab_allocations > 0
    assert report.host_slab_allocations_after_first_step == 0
    assert len(report.step_seconds) == 2 and len(report.baseline_step_seconds) == 2
    data = report.to_dict()
    assert data["layers"][0]["index"] == setup.plan_indices[0]
    assert data["peak"]["measured_bytes"] == report.peak_measured_bytes


def _built_params(setup):
    from framework.measure.profile import build_stage_model

    return list(build_stage_model(setup, CPU, 0).parameters())


def test_relative_error_handles_zero_predictions():
    assert relative_error(0, 0) is None
    assert relative_error(5, 0) == float("inf")
    assert relative_error(102, 100) == pytest.approx(0.02)


def test_mixed_precision_adamw_equals_torch_adamw_in_chunks(monkeypatch):
    from framework.measure.profile import MixedPrecisionAdamW

    monkeypatch.setattr(MixedPrecisionAdamW, "CHUNK", 999)  # several chunks per tensor
    generator = torch.Generator().manual_seed(0)
    mine = torch.nn.Parameter(torch.randn(100, 37, generator=generator))
    ref = torch.nn.Parameter(mine.detach().clone())
    reference = torch.optim.AdamW([ref], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    optimizer = MixedPrecisionAdamW([mine], lr=1e-2, weight_decay=0.1)
    for _ in range(4):
        grad = torch.randn(100, 37, generator=generator)
        mine.grad, ref.grad = grad.clone(), grad.clone()
        reference.step()
        optimizer.step()
    assert torch.allclose(mine, ref, rtol=1e-5, atol=1e-6)
    assert sum(t.numel() for t in optimizer.state_tensors()) == 3 * mine.numel()


def test_bf16_plan_at_full_size_keeps_16_bytes_per_parameter():
    cfg = _cfg()
    plan = manual_plan(cfg, layers=_mixed_layers(cfg), micro_batch_size=1)
    plan = dataclasses.replace(plan, train=dataclasses.replace(plan.train, dtype="bf16"))
    setup = profile_setup(cfg, plan, CPU, "full")
    assert setup.dtype == torch.bfloat16 and not setup.scaled
    report = run_profile(setup, plan, CPU, steps=2)
    for row in report.rows:
        assert row.measured.device_bytes == row.predicted.device_bytes, row
        assert row.measured.host_bytes == row.predicted.host_bytes, row
    params = sum(p.numel() for p in _built_params(setup))
    assert report.state_measured_bytes == STATE_BYTES_PER_PARAM * params
    assert report.peak_measured_bytes == report.peak_predicted_bytes
