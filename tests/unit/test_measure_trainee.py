"""framework/measure/trainee.py: a tiny model trained under each activation policy by the
runtime's train step; the policies train the same model and differ in where bytes live."""

import math

import pytest
import torch

from framework.measure.trainee import POLICIES, Trainee
from launch.compose import compose_config
from planner.plan import LayerPlan
from tests.plans import manual_plan

CPU = torch.device("cpu")
SEQ = 128


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cfg():
    return compose_config(
        [
            "model.num_layers=2",
            f"train.seq_len={SEQ}",
            "train.global_batch_size=1",
            "train.micro_batch_size=1",
        ]
    )


@pytest.fixture(scope="module")
def measured(cfg):
    """Under every policy, on a fresh Trainee: one untracked step (the optimizer's moments
    exist afterwards, so the tracked peak is the step's own), then two tracked steps."""
    layers = [LayerPlan(i, 0, 0.5, "none", 0.25, 1.0) for i in range(cfg.model.num_layers)]
    plan = manual_plan(cfg, layers=layers, micro_batch_size=1)
    results = {}
    for policy in POLICIES:
        trainee = Trainee(cfg, CPU, seed=0)
        trainee.use_policy(policy, plan, cfg)
        trainee.run(SEQ, steps=1, track_memory=False)
        results[policy] = trainee.run(SEQ, steps=2)
        trainee.use_policy("none")  # takes the plan's hooks and slabs off again
        assert trainee.runtime is None and trainee.pool is None
    return results


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_trains_two_finite_steps(measured, policy):
    result = measured[policy]
    assert result.failure is None
    assert len(result.seconds) == 2 and len(result.losses) == 2
    assert all(math.isfinite(loss) for loss in result.losses)
    assert result.losses[1] < result.losses[0]  # the same sequence twice: it learned
    assert result.device_peak_bytes is not None and result.device_peak_bytes > 0


def test_the_policies_train_the_same_model(measured):
    first = measured["none"].losses
    for policy in POLICIES:
        assert measured[policy].losses[0] == first[0], policy  # the same forward
        assert measured[policy].losses[1] == pytest.approx(first[1], rel=1e-5), policy


def test_full_recomputation_keeps_fewer_bytes_than_none(measured):
    none, full = measured["none"], measured["full"]
    assert full.device_peak_bytes < none.device_peak_bytes
    assert none.host_bytes == full.host_bytes == 0


def test_host_policies_hold_activations_on_the_host(measured):
    assert measured["save_on_cpu"].host_bytes > 0
    assert measured["save_on_cpu"].device_peak_bytes < measured["none"].device_peak_bytes
    assert measured["plan"].host_bytes > 0  # the plan's reserved slabs
    assert measured["plan"].device_peak_bytes < measured["none"].device_peak_bytes


def test_unknown_policy_and_plan_without_a_plan_are_refused(cfg):
    trainee = Trainee(cfg, CPU)
    with pytest.raises(ValueError, match="allowed: none, full, save_on_cpu, plan"):
        trainee.use_policy("offload")
    with pytest.raises(ValueError, match="needs the plan"):
        trainee.use_policy("plan")
    assert trainee.state_bytes() == 4 * sum(p.numel() for p in trainee.params)  # no moments yet
