"""ParallelDims validation, the pipeline stage maps, ZeRO-1 partitioning, gradient buckets and
the global gradient norm on one process."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from configs.errors import ConfigError
from parallel.dims import ParallelDims, stage_layers
from parallel.grad_norm import clip_grads_, global_grad_norm
from parallel.zero import BUCKET_BYTES, _buckets, partition_parameters
from planner.plan import LayerPlan
from planner.schedules import rank_stages
from tests.plans import manual_plan


def _cfg(tiny_config, **model):
    return dataclasses.replace(tiny_config, model=dataclasses.replace(tiny_config.model, **model))


def test_world_size_must_be_the_product():
    with pytest.raises(ConfigError, match=r"dp\*tp\*pp\*sp=2\*2\*1\*1=4 != world_size=2"):
        ParallelDims(dp=2, tp=2, pp=1, sp=1, world_size=2)
    assert ParallelDims(dp=2, tp=1, pp=2, sp=1, world_size=4).dp_sp == 2


@pytest.mark.parametrize(
    ("model", "tp", "sp", "seq_len", "message"),
    [
        ({"num_heads": 6, "num_kv_heads": 2, "hidden_size": 96}, 4, 1, 64, "num_heads=6 not"),
        ({"num_heads": 4, "num_kv_heads": 4, "ffn_size": 350}, 4, 1, 64, "ffn_size=350 not"),
        ({"num_heads": 12, "num_kv_heads": 4, "hidden_size": 96}, 1, 3, 63, "num_kv_heads/tp=4"),
        ({}, 1, 2, 63, "seq_len=63 not divisible by sp=2"),
        ({"num_heads": 4, "num_kv_heads": 2}, 2, 4, 64, "num_heads/tp=2 not divisible by sp=4"),
    ],
)  # fmt: skip
def test_model_checks_name_the_values(tiny_config, model, tp, sp, seq_len, message):
    cfg = _cfg(tiny_config, **model)
    dims = ParallelDims(dp=1, tp=tp, pp=1, sp=sp, world_size=tp * sp)
    with pytest.raises(ConfigError, match=message):
        dims.check_model(cfg.model, seq_len)


def test_gqa_with_fewer_kv_heads_than_sp_is_allowed(tiny_config):
    cfg = _cfg(tiny_config, num_heads=8, num_kv_heads=2)
    ParallelDims(dp=1, tp=1, pp=1, sp=4, world_size=4).check_model(cfg.model, 64)  # 2 | 4


def _dims(plan):
    layout = plan.layout
    return ParallelDims(layout.dp, layout.tp, layout.pp, layout.sp, layout.world_size)


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({"pp": 2, "pp_schedule": "1f1b", "virtual_stages": 2}, "1f1b needs 1, got 2"),
        ({"pp": 2, "pp_schedule": "interleaved_1f1b"}, "interleaved_1f1b needs >= 2, got 1"),
        ({"pp": 2, "pp_schedule": "zbv_zero_bubble", "virtual_stages": 1}, "needs 2, got 1"),
        ({"pp": 2, "pp_schedule": "gpipe", "micro": 16}, "num_microbatches: 1 < pp=2"),
        ({"pp": 2, "zero_backend": "deepspeed"}, "deepspeed needs tp=pp=sp=1, got tp=1 pp=2"),
        ({"dp": 2, "num_microbatches": 3}, r"dp\*micro_batch_size\*num_microbatches=2\*4\*3"),
    ],
)
def test_plan_checks_name_the_values(tiny_config, layout, message):
    fields = {k: v for k, v in layout.items() if k != "micro"}  # 16 rows, 4 micro-batches
    plan = manual_plan(tiny_config, micro_batch_size=layout.get("micro", 4), **fields)
    with pytest.raises(ConfigError, match=message):
        _dims(plan).check_plan(plan)


def test_every_stage_needs_a_layer(tiny_config):
    layers = [LayerPlan(i, 0, 0.0, "none", 0.0) for i in range(tiny_config.model.num_layers)]
    plan = manual_plan(tiny_config, layers=layers, pp=2, pp_schedule="1f1b")
    with pytest.raises(ConfigError, match="pipeline stage 1 of pp\\*virtual_stages=2 holds no"):
        stage_layers(plan)
    even = manual_plan(tiny_config, pp=2, pp_schedule="interleaved_1f1b", virtual_stages=2)
    assert stage_layers(even) == [[0], [1], [2], [3]]


@pytest.mark.parametrize(
    ("schedule", "virtual"), [("1f1b", 1), ("interleaved_1f1b", 3), ("zbv_zero_bubble", 2)]
)
def test_stage_maps_cover_every_stage_once(schedule, virtual):
    pp = 4
    owned = [rank_stages(r, pp, virtual, schedule) for r in range(pp)]
    assert sorted(s for stages in owned for s in stages) == list(range(pp * virtual))
    if schedule == "zbv_zero_bubble":  # V: rank 0 holds the first and the last stage
        assert owned[0] == (0, 7) and owned[3] == (3, 4)
    if schedule == "interleaved_1f1b":
        assert owned[1] == (1, 5, 9)


def test_zero1_partition_is_balanced_and_deterministic():
    params = [nn.Parameter(torch.zeros(n)) for n in (100, 10, 60, 50, 40, 5)]
    owners = partition_parameters(params, 2)
    assert owners == partition_parameters(params, 2)
    load = [sum(p.numel() for p, o in zip(params, owners, strict=True) if o == r) for r in (0, 1)]
    assert sorted(load) == [125, 140]  # largest first onto the lighter rank
    assert partition_parameters(params, 1) == [0] * len(params)


def test_buckets_split_by_dtype_and_size():
    big = torch.zeros(BUCKET_BYTES // 4)  # exactly one bucket of fp32
    tensors = [torch.zeros(3), big, torch.zeros(2, dtype=torch.float64), torch.zeros(1)]
    buckets = _buckets(tensors)
    assert [len(b) for b in buckets] == [1, 1, 1, 1]
    assert [len(b) for b in _buckets([torch.zeros(3)] * 5)] == [5]


def test_norm_and_clipping_match_torch_on_one_process():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 3))
    model(torch.randn(4, 8)).square().sum().backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    reference = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 3))
    for p, g in zip(reference.parameters(), expected_grads, strict=True):
        p.grad = g.clone()
    want = nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    got = global_grad_norm(model.parameters(), None, torch.device("cpu"))
    clip_grads_(model.parameters(), 0.5, got)
    torch.testing.assert_close(got, want)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    before = [p.grad.clone() for p in model.parameters()]
    clip_grads_(model.parameters(), 0.0, got)  # grad_clip=0: clipping off
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters(), strict=True))


def test_deepspeed_zero3_refuses_full_recomputation(tiny_config):
    layers = [
        LayerPlan(i, 0, 0.0, "full" if i == 2 else "selective", 0.0)
        for i in range(tiny_config.model.num_layers)
    ]
    for stage, backend, refused in (
        (3, "deepspeed", True),
        (2, "deepspeed", False),
        (3, "fsdp2", False),
    ):
        plan = manual_plan(tiny_config, layers=layers, dp=2, zero_stage=stage, zero_backend=backend)
        if refused:
            with pytest.raises(ConfigError, match=r"layers\[2\]\.recompute: full recomputation"):
                _dims(plan).check_plan(plan)
        else:
            _dims(plan).check_plan(plan)
