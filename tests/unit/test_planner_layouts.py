"""The layouts the planner may emit: every one satisfies the runtime's rules, the rules
reject what they should, and the search space honours pins and train.micro_batch_size."""

import dataclasses

import pytest

from configs.errors import ConfigError
from launch.compose import compose_config
from planner.layouts import check_layout, enumerate_layouts, explain_no_layout, layout_problems
from planner.plan import Layout


def _cfg(*overrides):
    return compose_config(list(overrides))


def _all(cfg, **planner):
    p = dataclasses.replace(cfg.planner, **planner)
    return enumerate_layouts(cfg.model, cfg.cluster, cfg.train, p)


@pytest.mark.parametrize(
    "overrides",
    [
        (
            "model=llama3_70b",
            "cluster=h100_64x",
            "train.seq_len=8192",
            "train.global_batch_size=64",
        ),
        (
            "model=llama3_2_1b",
            "cluster=h100_8x",
            "train.seq_len=4096",
            "train.global_batch_size=32",
        ),
        ("model=tiny", "cluster.gpus_per_node=4"),
    ],
)
def test_every_enumerated_layout_is_executable(overrides):
    cfg = _cfg(*overrides)
    layouts = _all(cfg) + _all(cfg, zero_backend="deepspeed")
    assert layouts
    for layout in layouts:
        assert layout_problems(layout, cfg.model, cfg.cluster, cfg.train) == []
    kinds = {layout.pp_schedule for layout in layouts}
    if cfg.cluster.world_size > 1:
        assert {"none", "1f1b", "interleaved_1f1b", "zbv_zero_bubble"} <= kinds


def test_rules_of_the_search_space():
    cfg = _cfg("model=llama3_70b", "cluster=h100_64x", "train.seq_len=8192",
               "train.global_batch_size=64")  # fmt: skip
    layouts = _all(cfg)
    m = cfg.model
    for lay in layouts:
        assert lay.world_size == 64
        assert lay.tp <= 8 and m.num_heads % lay.tp == 0 and m.num_kv_heads % lay.tp == 0
        kv = m.num_kv_heads // lay.tp
        assert (m.num_heads // lay.tp) % lay.sp == 0 and (kv % lay.sp == 0 or lay.sp % kv == 0)
        assert lay.dp * lay.micro_batch_size * lay.num_microbatches == 64
        assert lay.zero_backend == "fsdp2"
        if lay.pp > 1:
            assert lay.num_microbatches >= lay.pp
        if lay.pp_schedule in ("interleaved_1f1b", "interleaved_zero_bubble"):
            assert lay.virtual_stages >= 2 and lay.num_microbatches % lay.pp == 0
        if lay.pp_schedule == "zbv_zero_bubble":
            assert lay.virtual_stages == 2
        assert lay.pp * lay.virtual_stages <= m.num_layers
    # bf16 with FSDP2: the stages whose mixed precision the planner accounts for; with one
    # rank sharing the states, only one of them (test_bf16_fsdp2_layouts_use_...), unless
    # the states live in host RAM, where ZeRO-2 and 3 differ on one rank too
    kept = [lay for lay in layouts if lay.state_offload == "none"]
    offloaded = [lay for lay in layouts if lay.state_offload != "none"]
    assert {lay.zero_stage for lay in kept if lay.dp * lay.sp == 1} == {3}
    assert {lay.zero_stage for lay in kept if lay.dp * lay.sp > 1} == {2, 3}
    assert {lay.zero_stage for lay in offloaded if lay.dp * lay.sp == 1} == {2, 3}
    assert {lay.state_offload for lay in offloaded} == {"all"}  # FSDP2's kind
    assert len(offloaded) == len([lay for lay in kept if lay.zero_stage >= 2]) + sum(
        lay.dp * lay.sp == 1 for lay in kept
    )  # every ZeRO-2/3 layout once more, and ZeRO-2 beside a one-rank ZeRO-3


def test_deepspeed_only_without_tp_pp_sp():
    cfg = _cfg("cluster.gpus_per_node=4")
    layouts = _all(cfg, zero_backend="deepspeed")
    assert layouts
    assert all((lay.tp, lay.pp, lay.sp) == (1, 1, 1) for lay in layouts)
    assert all(lay.zero_backend == "deepspeed" for lay in layouts)
    bad = dataclasses.replace(layouts[0], dp=1, tp=4)
    assert any("deepspeed" in p for p in layout_problems(bad, cfg.model, cfg.cluster, cfg.train))


def test_pins_and_fixed_micro_batch():
    cfg = _cfg("model=llama2_7b", "cluster=h100_8x", "train.global_batch_size=32",
               "train.micro_batch_size=2")  # fmt: skip
    layouts = _all(cfg, tp=2, zero_stages=(3,), pp_schedules=("1f1b",))
    assert layouts
    assert all(lay.tp == 2 and lay.micro_batch_size == 2 for lay in layouts)
    assert {lay.pp_schedule for lay in layouts} <= {"none", "1f1b"}
    assert {lay.zero_stage for lay in layouts if lay.dp * lay.sp > 1} == {3}


def test_check_layout_names_the_broken_rule():
    cfg = _cfg("model=llama2_7b", "cluster=h100_8x")
    good = Layout(dp=8, tp=1, pp=1, sp=1, zero_stage=1, micro_batch_size=2, num_microbatches=1,
                  pp_schedule="none", zero_backend="fsdp2")  # fmt: skip
    check_layout(good, cfg.model, cfg.cluster, cfg.train)
    pipeline = {"dp": 1, "pp": 8, "micro_batch_size": 2, "num_microbatches": 8}
    cases = [
        ({"dp": 4}, "!= num_nodes*gpus_per_node"),
        ({"dp": 2, "tp": 4, "micro_batch_size": 8}, None),
        ({"dp": 1, "sp": 8, "micro_batch_size": 16}, None),
        ({**pipeline, "micro_batch_size": 4, "num_microbatches": 4, "pp_schedule": "1f1b"},
         "num_microbatches=4 < pp=8"),
        ({**pipeline, "pp_schedule": "interleaved_1f1b"}, "virtual_stages>=2"),
        ({**pipeline, "virtual_stages": 3, "pp_schedule": "zbv_zero_bubble"},
         "virtual_stages=2"),
        ({**pipeline, "micro_batch_size": 1, "num_microbatches": 16, "virtual_stages": 8,
          "pp_schedule": "interleaved_1f1b"}, "exceeds num_layers"),
    ]  # fmt: skip
    for change, message in cases:
        layout = dataclasses.replace(good, **change)
        problems = layout_problems(layout, cfg.model, cfg.cluster, cfg.train)
        if message is None:
            assert problems == []
        else:
            assert any(message in p for p in problems), (change, problems)
            with pytest.raises(ConfigError):
                check_layout(layout, cfg.model, cfg.cluster, cfg.train)


def test_sequence_parallel_rules():
    cfg = _cfg("model=llama3_8b", "cluster=h100_8x", "train.seq_len=4096")  # 32 heads, 8 kv
    base = Layout(dp=1, tp=2, pp=1, sp=4, zero_stage=0, micro_batch_size=16,
                  num_microbatches=1, pp_schedule="none", zero_backend="fsdp2")  # fmt: skip
    assert layout_problems(base, cfg.model, cfg.cluster, cfg.train) == []  # 4 kv per rank, sp 4
    odd = dataclasses.replace(cfg.train, seq_len=4098)
    assert any("seq_len" in p for p in layout_problems(base, cfg.model, cfg.cluster, odd))
    m = dataclasses.replace(cfg.model, num_heads=24, num_kv_heads=6, hidden_size=3072)
    assert any("neither divides" in p for p in layout_problems(base, m, cfg.cluster, cfg.train))


def test_bf16_fsdp2_layouts_use_the_zero_stages_the_planner_accounts_for():
    cfg = _cfg("model=llama3_2_1b", "cluster=h100_8x", "train.seq_len=4096",
               "train.global_batch_size=32")  # fmt: skip
    fsdp = _all(cfg)
    assert fsdp and {layout.zero_backend for layout in fsdp} == {"fsdp2"}
    assert {layout.zero_stage for layout in fsdp} == {2, 3}
    deepspeed = _all(cfg, zero_backend="deepspeed")
    assert {layout.zero_stage for layout in deepspeed} == {0, 1, 2, 3}
    # one GPU: FSDP2 on a one-rank mesh (bf16 compute from fp32 shards), ZeRO-3
    one = _all(_cfg("model=llama3_2_1b", "cluster=h100_1x", "train.seq_len=4096"))
    kept = [layout for layout in one if layout.state_offload == "none"]
    assert {(layout.world_size, layout.zero_stage) for layout in kept} == {(1, 3)}
    # fp32 (the CPU) keeps stages 0/1, and one rank lists only the lowest
    cpu = _all(_cfg("model=tiny", "cluster.gpus_per_node=4"))
    assert {layout.zero_stage for layout in cpu if layout.dp * layout.sp > 1} == {0, 1, 2, 3}
    assert {layout.zero_stage for layout in cpu if layout.dp * layout.sp == 1} == {0}


def test_bf16_fsdp2_without_zero_2_or_3_is_refused_with_the_reason():
    cfg = _cfg("model=llama3_2_1b", "cluster=h100_8x", "train.seq_len=4096",
               "train.global_batch_size=32", "planner.zero_stages=[0,1]")  # fmt: skip
    assert _all(cfg) == []
    error = explain_no_layout(cfg.model, cfg.cluster, cfg.train, cfg.planner)
    assert error.key == "planner.zero_stages" and "autocast" in str(error)
