"""framework/measure/trace.py: the fake-tensor trace of a plan's runtime step, checked against
the same step on real CPU tensors, and its report's fields."""

from __future__ import annotations

import json
import multiprocessing

import pytest

from framework.components.model import build_model, count_parameters
from framework.measure.trace import UntracedLayout, trace_plan, untraced_reason
from launch.compose import compose_config
from planner.plan import LayerPlan
from tests.plans import manual_plan

BASE = ["model=tiny", "model.num_layers=2", "train.seq_len=64", "train.global_batch_size=2"]


@pytest.fixture(scope="module")
def cfg():
    return compose_config(BASE)


def local_plan(cfg, layers=None):
    return manual_plan(cfg, layers=layers, micro_batch_size=1)


def relative(a: int, b: int) -> float:
    return abs(a - b) / max(b, 1)


def test_the_traced_peak_is_stable_and_the_json_has_predicted_traced_pairs(cfg):
    plan = local_plan(cfg)
    first = trace_plan(cfg.model, cfg.train, plan)
    second = trace_plan(cfg.model, cfg.train, plan)
    assert first.runtime == "LocalRuntime" and first.tracker == "MemTracker"
    assert first.traced_peak_bytes == second.traced_peak_bytes > 0
    data = json.loads(json.dumps(first.to_dict()))
    for key in ("predicted_peak_bytes", "traced_peak_bytes", "predicted_host_bytes"):
        assert key in data
    assert data["traced_host_bytes"] == 0
    names = [phase["name"] for phase in data["phases"]]
    for name in (
        "forward layer 0",
        "forward layer 1",
        "loss",
        "backward layer 1",
        "backward layer 0",
        "optimizer step",
    ):
        assert name in names
    assert data["peak_phase"] in names
    assert max(p["traced_peak_bytes"] for p in data["phases"]) == data["traced_peak_bytes"]
    # fp32 parameters and AdamW's two moments are tracked
    params = count_parameters(build_model(cfg.model))
    assert data["traced_at_peak"]["Parameter"] == 4 * params
    assert data["traced_at_peak"]["Optstate"] >= 8 * params


@pytest.mark.parametrize(
    "policy",
    [
        (0.0, "none", 0.0, 0.0),
        (0.5, "none", 0.25, 0.5),
        (0.0, "full", 0.0, 1.0),
    ],
    ids=["keep", "offload+recompute", "full"],
)
def test_the_fake_trace_agrees_with_the_same_step_on_real_cpu_tensors(cfg, policy):
    layers = [LayerPlan(i, 0, *policy) for i in range(cfg.model.num_layers)]
    plan = local_plan(cfg, layers)
    fake = trace_plan(cfg.model, cfg.train, plan)
    real = trace_plan(cfg.model, cfg.train, plan, fake=False)
    assert relative(fake.traced_peak_bytes, real.traced_peak_bytes) < 0.01
    assert fake.traced_host_bytes == real.traced_host_bytes
    assert relative(fake.traced_after_step_bytes, real.traced_after_step_bytes) < 0.01
    if policy[0] > 0:
        assert fake.traced_host_bytes > 0
        assert any("host slabs" in note for note in fake.notes)


def test_fsdp2_zero3_at_dp2_on_a_fake_group_traces_rank_0_with_half_the_parameters(cfg):
    cfg2 = compose_config([*BASE, "cluster.gpus_per_node=2"])
    zero3 = manual_plan(cfg2, micro_batch_size=1, dp=2, zero_stage=3)
    report = trace_plan(cfg2.model, cfg2.train, zero3)
    assert report.runtime == "ParallelRuntime" and report.tracker == "FSDPMemTracker"
    assert report.world_size == 2
    params = report.traced_at_peak["Sharded Param"]
    one = trace_plan(cfg.model, cfg.train, manual_plan(cfg, micro_batch_size=1, zero_stage=3))
    assert params * 2 == pytest.approx(one.traced_at_peak["Sharded Param"], rel=0.02)


def interleaved_plan(cfg):
    """pp2 with two stages per rank (interleaved 1F1B): a layout the tracer cannot run."""
    return manual_plan(
        cfg, micro_batch_size=1, pp=2, virtual_stages=2, pp_schedule="interleaved_1f1b"
    )


def test_multi_stage_pipeline_and_deepspeed_layouts_say_why_they_are_not_traced(cfg):
    cfg2 = compose_config([*BASE, "cluster.gpus_per_node=2"])
    assert "stages per rank" in untraced_reason(interleaved_plan(cfg2))
    assert untraced_reason(manual_plan(cfg2, micro_batch_size=1, pp=2)) is None  # 1F1B
    deepspeed = manual_plan(cfg, micro_batch_size=1, zero_backend="deepspeed", zero_stage=2)
    assert "deepspeed" in untraced_reason(deepspeed)
    assert untraced_reason(local_plan(cfg)) is None
    with pytest.raises(UntracedLayout, match="stages per rank"):
        trace_plan(cfg2.model, cfg2.train, interleaved_plan(cfg2))


@pytest.mark.parametrize(("dp", "zero_stage"), [(1, 3), (2, 2)])
def test_the_fake_fsdp2_trace_agrees_with_real_cpu_tensors_on_the_fake_group(dp, zero_stage):
    """Real tensors on torch's fake process group (its collectives move no data, so values
    are wrong at dp > 1 but every buffer has its real size) against the fake-tensor trace."""
    cfg2 = compose_config([*BASE, f"cluster.gpus_per_node={dp}"])
    layers = [LayerPlan(i, 0, 0.5, "none", 0.25, 0.5) for i in range(cfg2.model.num_layers)]
    plan = manual_plan(cfg2, layers=layers, micro_batch_size=1, dp=dp, zero_stage=zero_stage)
    fake = trace_plan(cfg2.model, cfg2.train, plan)
    real = trace_plan(cfg2.model, cfg2.train, plan, fake=False)
    assert fake.tracker == real.tracker == "FSDPMemTracker"
    assert relative(fake.traced_peak_bytes, real.traced_peak_bytes) < 0.01
    assert fake.traced_host_bytes == real.traced_host_bytes > 0


def test_each_pipeline_rank_of_a_1f1b_plan_traces_its_own_stage():
    """pp2 1F1B: the fake group's rank picks the traced pipeline rank, whose phases are its
    own layers' (rank 0: layer 0, rank 1: layer 1). Rank 1 runs in a fresh process: a second
    fake group in one process finds the first one's group names in DTensor's caches."""
    cfg = compose_config([*BASE, "cluster.gpus_per_node=2", "train.global_batch_size=4"])
    plan = manual_plan(cfg, micro_batch_size=1, pp=2)
    first = trace_plan(cfg.model, cfg.train, plan, pp_rank=0)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        (second,) = pool.starmap(trace_plan, [(cfg.model, cfg.train, plan, True, None, 1)])
    assert (first.traced_rank, second.traced_rank) == (0, 1)
    assert first.traced_peak_bytes > 0 and second.traced_peak_bytes > 0
    names = [{phase.name for phase in report.phases} for report in (first, second)]
    assert "backward layer 0" in names[0] and "backward layer 1" not in names[0]
    assert "backward layer 1" in names[1] and "backward layer 0" not in names[1]
