"""Model states in host memory (layout.state_offload, issue 13): the planner offloads them only
where nothing else fits, counts them in host RAM per node, explains a host RAM that is too
small with the smallest cluster.host_memory_gib that works, and never offloads more (or runs
slower) with more GPU memory."""

from __future__ import annotations

import json

import pytest

from configs.errors import ConfigError
from framework.components.model import build_model, count_parameters
from launch.compose import compose_config
from planner.errors import NoFeasiblePlan
from planner.layouts import enumerate_layouts, plan_problems
from planner.make import make_plan
from planner.plan import Plan
from tests.plans import manual_plan

LLAMA3_8B_ONE_H100 = ["model=llama3_8b", "cluster=h100_1x", "train.seq_len=4096"]
LLAMA2_13B_ONE_A800 = [
    "model=llama2_13b", "cluster=a800_8x", "cluster.gpus_per_node=1", "train.seq_len=4096",
]  # fmt: skip


def test_llama2_13b_on_one_a800_offloads_its_states_to_host_ram():
    cfg = compose_config(LLAMA2_13B_ONE_A800)
    plan = make_plan(cfg, explain=False)
    assert plan.layout.state_offload == "all"
    assert plan.memory.params_bytes == plan.memory.optimizer_bytes == 0
    # FSDP2's CPU shards on one rank: fp32 parameters and gradients, each pinned by torch's
    # caching host allocator (a power of two per tensor), and Adam's m and v (not pinned)
    model = build_model(cfg.model)
    num_params = count_parameters(model)
    pinned = sum(2 * (1 << (4 * p.numel() - 1).bit_length()) for p in model.parameters())
    assert plan.ranks[0].host_states_bytes == pytest.approx(pinned + 8 * num_params, rel=1e-9)
    assert plan.memory.host_bytes_per_node >= 16 * num_params
    assert plan.memory.host_bytes_per_node <= plan.memory.host_budget_bytes_per_node
    assert plan.memory.gpu_peak_bytes <= plan.memory.gpu_budget_bytes
    # the host CPUs' AdamW step: 13B parameters at the preset's 4e9 per second
    assert plan.time.optimizer_seconds >= num_params / 4.0e9


def test_host_ram_too_small_names_host_ram_and_the_size_that_works():
    cfg = compose_config(LLAMA3_8B_ONE_H100)  # 128 GiB of host RAM: 16 B x 8B params do not fit
    with pytest.raises(NoFeasiblePlan) as info:
        make_plan(cfg)
    message = str(info.value)
    assert message.startswith("host RAM binds")
    needed = int(message.split("cluster.host_memory_gib>=")[1].split()[0])
    plan = make_plan(compose_config([*LLAMA3_8B_ONE_H100, f"cluster.host_memory_gib={needed}"]))
    assert plan.layout.state_offload == "all"


def test_without_state_offload_the_explainer_offers_it():
    cfg = compose_config([*LLAMA2_13B_ONE_A800, "planner.state_offload=off"])
    assert all(lay.state_offload == "none" for lay in enumerate_layouts(
        cfg.model, cfg.cluster, cfg.train, cfg.planner
    ))  # fmt: skip
    with pytest.raises(NoFeasiblePlan, match=r"planner\.state_offload=on"):
        make_plan(cfg)


def test_more_gpu_memory_never_adds_offload_and_never_slows():
    base = ["model=llama2_7b", "model.num_layers=8", "cluster=h100_1x", "train.seq_len=4096",
            "train.global_batch_size=4", "cluster.host_memory_gib=1024"]  # fmt: skip
    previous = None
    offloaded = []
    for gib in (12, 16, 24, 32, 48, 64, 96):
        plan = make_plan(compose_config([*base, f"cluster.gpu_memory_gib={gib}"]), explain=False)
        offloaded.append(plan.layout.state_offload == "all")
        if previous is not None:
            assert plan.time.step_seconds <= previous.time.step_seconds * 1.01, gib
            assert not (offloaded[-1] and not offloaded[-2]), gib
        previous = plan
    assert offloaded[0] and not offloaded[-1]  # the grid crosses the point where it is needed


def test_each_backend_runs_its_own_kind_of_state_offload_at_zero_2_and_3():
    cfg = compose_config(["cluster.gpus_per_node=2"])
    for fields in (
        {"zero_stage": 1, "state_offload": "all"},
        {"zero_stage": 3, "zero_backend": "deepspeed", "state_offload": "all"},
        {"zero_stage": 3, "state_offload": "optimizer"},
        {"zero_stage": 1, "zero_backend": "deepspeed", "state_offload": "optimizer"},
    ):
        problems = plan_problems(manual_plan(cfg, dp=2, micro_batch_size=8, **fields))
        assert [p.key for p in problems] == ["layout.state_offload"], fields
    for fields in (
        {"zero_stage": 2, "state_offload": "all"},
        {"zero_stage": 3, "zero_backend": "deepspeed", "state_offload": "optimizer"},
        {"zero_stage": 2, "zero_backend": "deepspeed", "state_offload": "optimizer"},
    ):
        assert not plan_problems(manual_plan(cfg, dp=2, micro_batch_size=8, **fields)), fields
    # DeepSpeed ZeRO-2 offload with gradient accumulation keeps uncounted host buffers
    accumulating = {"zero_stage": 2, "zero_backend": "deepspeed", "state_offload": "optimizer"}
    problems = plan_problems(manual_plan(cfg, dp=2, micro_batch_size=4, **accumulating))
    assert [p.key for p in problems] == ["layout.state_offload"]
    assert "num_microbatches=2" in problems[0].message


def test_deepspeed_offloads_the_optimizer_and_keeps_the_bf16_weights():
    cfg = compose_config([*LLAMA2_13B_ONE_A800, "planner.zero_backend=deepspeed"])
    plan = make_plan(cfg, explain=False)
    assert plan.layout.zero_backend == "deepspeed"
    assert plan.layout.state_offload == "optimizer"
    num_params = count_parameters(build_model(cfg.model))
    rank = plan.ranks[0]
    assert rank.params_bytes == 2 * num_params  # bf16, whole on one rank at ZeRO-2 and 3
    assert rank.grads_bytes == rank.optimizer_bytes == 0
    assert rank.host_states_bytes >= 16 * num_params


def test_a_plan_written_before_the_field_reads_as_not_offloaded(tmp_path):
    cfg = compose_config([])
    data = manual_plan(cfg).to_dict()
    del data["layout"]["state_offload"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    assert Plan.read(path).layout.state_offload == "none"


def test_an_offloading_plan_needs_a_process_group():
    """Outside torchrun a one-rank plan would run the local runtime, which keeps the states
    on the device: refused, not silently different from the plan."""
    import torch

    from framework.components.distributed import DistContext
    from framework.runtime.build import build_runtime

    cfg = compose_config([])
    plan = manual_plan(cfg, zero_stage=3, state_offload="all")
    context = DistContext(rank=0, world_size=1, local_rank=0)
    with pytest.raises(ConfigError, match=r"^layout\.state_offload: .*memplan train"):
        build_runtime(cfg.model, cfg.train, plan, torch.device("cpu"), torch.float32, context)
