"""How `memplan plan` writes numbers: counts with a unit, bytes in a unit that fits, no
negative zero, a recompute time that does not read as 'nothing recomputes'."""

from __future__ import annotations

import dataclasses
import io
import re

from rich.console import Console

from launch.compose import compose_config
from launch.plan_command import percent, print_plan, recompute_note, signed_bytes
from planner.make import make_plan
from planner.plan import LayerPlan
from planner.units import MIB, format_bytes, format_count
from tests.plans import manual_plan


def test_counts_read_with_a_suffix():
    assert format_count(804_224) == "804K"
    assert format_count(1_235_814_400) == "1.24B"
    assert format_count(6_738_415_616) == "6.74B"
    assert format_count(70_553_706_496) == "70.6B"
    assert format_count(999_999) == "1M"  # not "1000K"
    assert format_count(12) == "12"


def test_bytes_pick_a_unit_and_keep_the_sign_in_front():
    assert format_bytes(11.2 * MIB) == "11.20 MiB"  # was "0.01 GiB"
    assert signed_bytes(-2.24 * MIB) == "-2.24 MiB"
    assert signed_bytes(0) == "0 B"


def test_percentages_never_read_as_negative_zero():
    assert percent(-2.24 * MIB, 7.6 * 2**30) == "-0.03%"
    assert percent(0, 1) == "0%"
    assert percent(5, 0) == "-"
    assert percent(1, 8) == "12.5%"
    assert percent(-1, 10**12) == "-1e-10%"


def _printed(plan, cfg) -> str:
    out = io.StringIO()
    print_plan(plan, cfg, Console(file=out, width=160))
    return out.getvalue()


def test_the_tiny_plan_prints_its_size_and_small_parts_in_small_units():
    cfg = compose_config([])
    text = _printed(make_plan(cfg), cfg)
    assert "tiny (804K params)" in text
    assert "0.00 GiB" not in text
    assert not re.search(r"-0\.0*(?![0-9])", text), "a negative zero"
    pending = next(line for line in text.splitlines() if "grads not yet produced" in line)
    assert " MiB " in pending and "-" in pending


def test_zero_recompute_on_the_busiest_rank_is_explained():
    cfg = compose_config(["cluster.gpus_per_node=2"])
    layers = [LayerPlan(i, i // 2, 0.0, ("full", "none", "none", "none")[i], 0.0) for i in range(4)]
    plan = manual_plan(cfg, layers=layers, pp=2)  # its times are zero: nothing predicted
    note = recompute_note(plan)
    assert note == "* recompute: 1 full layers, all on other pipeline ranks"
    text = _printed(plan, cfg)
    assert "0 s*" in text and note in text and "busiest pipeline rank" in text
    timed = dataclasses.replace(plan, time=dataclasses.replace(plan.time, recompute_seconds=0.5))
    assert recompute_note(timed) is None
    one_rank = manual_plan(compose_config([]), layers=[dataclasses.replace(layers[0], stage=0)]
                           + [dataclasses.replace(x, stage=0) for x in layers[1:]])  # fmt: skip
    assert recompute_note(one_rank) is None
