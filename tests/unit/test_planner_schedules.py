"""The planner replays pipeline schedules in pure Python (planner/ never imports torch); the
replay must be torch.distributed.pipelining's own action order, or the in-flight
micro-batch counts behind every pipeline memory prediction are wrong."""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch.distributed.pipelining.schedules as torch_schedules

from planner.schedules import (
    inflight_profiles,
    peak_inflight,
    rank_actions,
    rank_stages,
    stage_rank,
    step_seconds,
)

KINDS = {
    torch_schedules._ComputationType.FORWARD: "F",
    torch_schedules._ComputationType.FULL_BACKWARD: "B",
    torch_schedules._ComputationType.BACKWARD_INPUT: "I",
    torch_schedules._ComputationType.BACKWARD_WEIGHT: "W",
}


def torch_actions(schedule: str, rank: int, pp: int, v: int, g: int) -> list[tuple[str, int]]:
    """(kind, local stage) actions torch computes for one rank (compute actions only)."""
    if schedule == "zbv_zero_bubble":
        fake = SimpleNamespace(pp_group_size=pp, _n_microbatches=g, num_stages=2 * pp)
        ops = torch_schedules.ScheduleZBVZeroBubble._calculate_single_rank_operations(fake, rank)
    else:
        cls = {
            "interleaved_1f1b": torch_schedules.ScheduleInterleaved1F1B,
            "interleaved_zero_bubble": torch_schedules.ScheduleInterleavedZeroBubble,
        }[schedule]
        rounds = max(1, g // pp)
        fake = SimpleNamespace(
            n_local_stages=v, pp_group_size=pp, microbatches_per_round=g // rounds,
            _n_microbatches=g,
        )  # fmt: skip
        ops = cls._calculate_single_rank_operations(fake, rank)
    local = rank_stages(rank, pp, v, schedule)
    return [
        (KINDS[op.computation_type], local.index(op.stage_index))
        for op in ops
        if op is not None and op.computation_type in KINDS
    ]


@pytest.mark.parametrize("schedule", ["interleaved_1f1b", "interleaved_zero_bubble"])
@pytest.mark.parametrize("pp", [2, 3, 4, 8])
@pytest.mark.parametrize("v", [2, 3, 4])
@pytest.mark.parametrize("rounds", [1, 2, 3])
def test_interleaved_replay_is_torchs_order(schedule, pp, v, rounds):
    g = pp * rounds
    for rank in range(pp):
        assert rank_actions(schedule, rank, pp, v, g) == torch_actions(schedule, rank, pp, v, g)


@pytest.mark.parametrize("pp", [2, 3, 4, 8])
@pytest.mark.parametrize("g", [1, 2, 4, 8, 16, 24])
def test_zbv_replay_is_torchs_order(pp, g):
    for rank in range(pp):
        ours = rank_actions("zbv_zero_bubble", rank, pp, 2, g)
        assert ours == torch_actions("zbv_zero_bubble", rank, pp, 2, g)


def _torch_single_stage_peaks(cls, pp: int, g: int) -> list[int]:
    fake = SimpleNamespace(_num_stages=pp, _n_microbatches=g)
    order = cls._get_pipeline_order(fake)
    peaks = []
    for rank in range(pp):
        live, peak = 0, 0
        for op in order[rank]:
            if op is None or op.computation_type not in KINDS:
                continue
            live += 1 if KINDS[op.computation_type] == "F" else -1
            peak = max(peak, live)
        peaks.append(peak)
    return peaks


@pytest.mark.parametrize("pp", [2, 4, 8])
@pytest.mark.parametrize("g", [8, 16])
def test_single_stage_schedules_match_torch_peaks(pp, g):
    profiles = inflight_profiles("1f1b", pp, 1, g)
    assert [p[0][0] for p in profiles] == [pp - r for r in range(pp)]
    assert [p[0][0] for p in profiles] == _torch_single_stage_peaks(
        torch_schedules.Schedule1F1B, pp, g
    )
    gpipe = inflight_profiles("gpipe", pp, 1, g)
    assert [p[0][0] for p in gpipe] == _torch_single_stage_peaks(
        torch_schedules.ScheduleGPipe, pp, g
    )
    assert all(p[0][0] == g for p in gpipe)


def test_interleaved_first_rank_holds_megatrons_count():
    """Megatron's interleaved warm-up: rank 0 holds (v-1) pp + 2(pp-1) + 1 stage-micro-batches."""
    pp, v, g = 4, 2, 8
    vectors = inflight_profiles("interleaved_1f1b", pp, v, g)[0]
    assert max(sum(vec) for vec in vectors) == (v - 1) * pp + 2 * (pp - 1) + 1
    # only maximal vectors are kept: none dominates another
    for a in vectors:
        for b in vectors:
            assert a == b or not all(x >= y for x, y in zip(a, b, strict=True))


def test_zbv_holds_as_much_as_1f1b_on_every_rank():
    pp, g = 4, 8
    for vectors in inflight_profiles("zbv_zero_bubble", pp, 2, g):
        assert max(sum(vec) for vec in vectors) == 2 * pp
    assert peak_inflight("zbv_zero_bubble", pp, 2, g) == 2 * pp


def test_stage_placement():
    assert [stage_rank(c, 4, "interleaved_1f1b") for c in range(8)] == [0, 1, 2, 3] * 2
    assert [stage_rank(c, 4, "zbv_zero_bubble") for c in range(8)] == [0, 1, 2, 3, 3, 2, 1, 0]
    assert rank_stages(0, 4, 2, "zbv_zero_bubble") == (0, 7)
    assert rank_stages(1, 4, 3, "interleaved_1f1b") == (1, 5, 9)


def test_step_formulas():
    t = [1.0, 2.0, 1.0, 1.0]
    total, bubble = step_seconds("1f1b", 4, 1, 8, t, [0.0] * 4)
    assert total == pytest.approx(7 * 2.0 + 5.0)  # Mist: (G-1) max + sum
    assert bubble == pytest.approx(total - 8 * 2.0)
    total, _ = step_seconds("interleaved_1f1b", 2, 2, 4, t, [0.0] * 4)
    assert total == pytest.approx(4 * 3.0 + 1 * 2.0)  # G max_rank + (pp-1) max_stage
    total, bubble = step_seconds("zbv_zero_bubble", 2, 2, 4, t, [0.5, -1.0, 0.25, 0.0])
    assert total == pytest.approx(4 * 3.0 + 0.5) and bubble == pytest.approx(0.5)
    assert step_seconds("none", 1, 1, 3, [2.0], [0.0]) == (6.0, 0.0)


def test_counts_are_balanced_per_chunk():
    """Every forward of every local stage is matched by one freeing action."""
    for schedule, pp, v, g in [
        ("interleaved_1f1b", 4, 3, 8),
        ("interleaved_zero_bubble", 4, 2, 12),
        ("zbv_zero_bubble", 3, 2, 6),
    ]:
        for rank in range(pp):
            live = defaultdict(int)
            for kind, chunk in rank_actions(schedule, rank, pp, v, g):
                live[chunk] += {"F": 1, "B": -1, "W": -1, "I": 0}[kind]
            assert set(live.values()) == {0}
