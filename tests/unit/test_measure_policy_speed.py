"""framework/measure/policy_speed.py: the torch baselines train exactly like the plain layers,
the bytes each side keeps are counted right (full recomputation keeps the same bytes as
torch's checkpoint, a save_on_cpu that really copies), the rounds are rotated, and
bench/policy_speed.py prints its table and writes JSON."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from framework.measure import policy_speed as ps
from launch.compose import compose_config

SEQ, BATCH = 24, 2


@pytest.fixture(scope="module")
def small_cfg():
    base = compose_config([]).model
    return dataclasses.replace(
        base, num_layers=4, hidden_size=32, num_heads=4, num_kv_heads=2, ffn_size=88
    )


def _gradients(stack: ps.Stack, variant: ps.Variant) -> dict[str, torch.Tensor]:
    ps.run_variant(stack, variant)
    grads = {name: p.grad.clone() for name, p in stack.model.layers.named_parameters()}
    grads["x"] = stack.x.grad.clone()
    return grads


def test_every_variant_gives_the_plain_gradients(small_cfg):
    stack = ps.build_stack(small_cfg, SEQ, BATCH)
    plain = _gradients(stack, ps.torch_variant("torch:plain", None))
    for row in ps.ROWS:
        for variant in ps.row_variants(row, small_cfg.num_layers):
            grads = _gradients(stack, variant)
            for name, want in plain.items():
                torch.testing.assert_close(
                    grads[name], want, rtol=1e-5, atol=1e-7, msg=f"{variant.key} {name}"
                )
    # removing a variant restores the plain layers
    assert all(layer.activation_policy is None for layer in stack.layers)
    assert all(layer.cheap_op_runner is None for layer in stack.layers)


def test_saved_bytes_of_each_side(small_cfg):
    rows = [ps.NONE, ps.KEEP_ENGINE, ps.FULL, ps.SELECTIVE, "offload 100%", "token-wise 50%"]
    result = ps.measure_length(small_cfg, SEQ, BATCH, rows, rounds=2, warmup=0)
    by_row = {row.row: row for row in result.rows}
    layers, hidden = small_cfg.num_layers, small_cfg.hidden_size
    x_bytes = BATCH * SEQ * hidden * 4
    plain = by_row[ps.NONE].torch_bytes
    assert plain[1] == 0 and plain[0] > layers * x_bytes
    # the plain layers, the training path and the engine keeping everything hold the same
    assert by_row[ps.NONE].memplan_bytes == plain == by_row[ps.KEEP_ENGINE].memplan_bytes
    # full recomputation: each layer keeps its input, like torch's checkpoint
    assert by_row[ps.FULL].memplan_bytes == by_row[ps.FULL].torch_bytes == (layers * x_bytes, 0)
    # selective: no more bytes than torch's matmul-saving selective checkpoint
    selective = by_row[ps.SELECTIVE]
    assert 0 < selective.memplan_bytes[0] <= selective.torch_bytes[0]
    # offload everything: nothing on the device; torch copies every saved tensor, weights too
    everything = by_row["offload 100%"]
    assert everything.memplan_bytes == (0, plain[0])
    assert everything.torch_bytes[0] == 0 and everything.torch_bytes[1] > plain[0]
    assert by_row["token-wise 50%"].memplan_bytes[0] < plain[0]
    assert all(len(times) == 2 for times in result.seconds.values())
    assert {t.name for t in ps.targets(result)} >= {"full / torch checkpoint"}


def test_save_on_cpu_hooks_copy_both_ways():
    meter = ps.SavedBytes(excluded=set())
    pack, unpack = ps.save_on_cpu_hooks(meter)
    tensor = torch.arange(6.0).view(2, 3).t()
    packed = pack(tensor)
    host = packed[1]
    assert host.untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr()
    back = unpack(packed)
    assert back.untyped_storage().data_ptr() != host.untyped_storage().data_ptr()
    assert torch.equal(back, tensor)
    assert meter.host_bytes == 24 and meter.device_bytes == 0


def test_spread_layers_and_rotated_rounds():
    assert ps.spread_layers(8, 0.25) == {0, 4}
    assert ps.spread_layers(8, 0.5) == {0, 2, 4, 6}
    assert ps.spread_layers(8, 0.75) == {0, 1, 2, 4, 5, 6}
    assert ps.spread_layers(8, 1.0) == set(range(8))
    assert ps.spread_layers(8, 0.0) == set()
    order = ["a", "b", "c"]
    rounds = [ps.rotated(order, r) for r in range(6)]
    assert rounds[:3] == [["a", "b", "c"], ["a", "c", "b"], ["c", "a", "b"]]
    for place in range(3):
        assert {r[place] for r in rounds} == set(order), "every variant at every place"
    predecessors = {(r[i - 1], r[i]) for r in rounds for i in range(1, 3)}
    assert ("a", "b") in predecessors and ("b", "a") in predecessors


def test_token_wise_share_is_the_ratio_of_extras():
    def row(name, extra):
        return ps.RowResult(name, "m", "t", 1.0, 1.0, 1.0, (0, 0), (0, 0), extra)

    result = ps.LengthResult(8, 1, 1, "cpu", [row(ps.FULL, 0.4), row("token-wise 25%", 0.1)], {})
    found = {t.name: t for t in ps.targets(result)}
    share = found["token-wise 25% extra / full's extra"]
    assert share.value == pytest.approx(0.25) and share.met
    assert not ps.Target("x", 1.02, 1.01).met


def test_bench_script_prints_the_table_and_writes_json(tmp_path, capsys):
    path = Path(__file__).resolve().parents[2] / "bench" / "policy_speed.py"
    spec = importlib.util.spec_from_file_location("policy_speed_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "speed.json"
    args = ["--hidden", "32", "--layers", "2", "--seq", "16", "--rounds", "1", "--warmup", "0"]
    args += ["--threads", "0", "--optimizer-rounds", "2", "--out", str(out)]
    args += ["--rows", ps.NONE, ps.FULL, "token-wise 25%"]
    assert module.main(args) == 0
    printed = capsys.readouterr().out
    assert "memplan/torch" in printed and "full / torch checkpoint" in printed
    assert "optimizer step: fused" in printed
    report = json.loads(out.read_text())
    assert [row["row"] for row in report["lengths"][0]["rows"]] == [
        ps.NONE,
        ps.FULL,
        "token-wise 25%",
    ]
    assert report["optimizer"]["parameters"] > 0
