"""planner/plot.py: rank labels that do not run together, recompute modes drawn, a PNG."""

from __future__ import annotations

from dataclasses import replace

import pytest

from launch.compose import compose_config
from planner.plan import LayerPlan, MemoryBreakdown, PipelineRankMemory
from planner.plot import layer_fractions, rank_ticks, write_plot
from tests.plans import manual_plan


def test_rank_labels_thin_out_past_sixteen_ranks():
    assert rank_ticks(0) == ([], [])  # a plan written before per-rank memory existed
    assert rank_ticks(1) == ([0], ["0"])
    assert rank_ticks(16) == (list(range(16)), [str(r) for r in range(16)])
    positions, labels = rank_ticks(64)
    assert len(labels) <= 17 and positions[0] == 0 and positions[-1] == 63
    assert rank_ticks(20)[0] == [*range(0, 20, 2), 19]


def test_full_layers_are_all_recomputed_and_the_fractions_add_up():
    layers = [
        LayerPlan(0, 0, 0.25, "none", 0.5),
        LayerPlan(1, 0, 0.0, "selective", 0.0),
        LayerPlan(2, 0, 0.0, "full", 0.0),
    ]
    kept, offloaded, recomputed = layer_fractions(layers)
    assert (kept, offloaded, recomputed) == ([0.25, 1.0, 0.0], [0.25, 0.0, 0.0], [0.5, 0.0, 1.0])


@pytest.mark.parametrize("pp", [1, 8, 16])
def test_a_pipeline_of_any_depth_is_drawn(tmp_path, pp):
    matplotlib = pytest.importorskip("matplotlib")
    cfg = compose_config(["model=llama3_70b", f"cluster.gpus_per_node={pp}"])
    modes = ("none", "selective", "full", "none")
    layers = [
        LayerPlan(
            i, i * pp // 80, 0.0 if modes[i % 4] == "full" else 0.1 * (i % 3), modes[i % 4], 0.0
        )
        for i in range(80)
    ]
    gib = 2**30
    ranks = tuple(
        PipelineRankMemory(r, (r,), 80 // pp, 2 * gib, 2 * gib, 12 * gib, (30 + r) * gib,
                           3 * gib, gib, 51 * gib + r * gib, 0, grads_pending_bytes=gib)
        for r in range(pp)
    )  # fmt: skip
    memory = MemoryBreakdown(74 * gib, 66 * gib, 2 * gib, 2 * gib, 12 * gib, 45 * gib, 4 * gib, 0)
    plan = replace(manual_plan(cfg, layers=layers, pp=pp), ranks=ranks, memory=memory)
    out = tmp_path / "plot.png"
    write_plot(plan, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.pyplot.get_fignums() == []  # the figure is closed
