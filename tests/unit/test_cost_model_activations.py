"""The cost model's saved-activation bytes against a real measurement: SavedTensorLedger
(saved_tensors_hooks, deduplicated by storage) on scaled-down versions of every preset, per
layer and outside the layers, without tensor parallelism and under tp emulation (a layer
with heads/tp, kv_heads/tp and ffn/tp at the same head_dim is exactly one TP rank's layer).
Required agreement: +/-1%."""

import dataclasses

import pytest
import torch

from framework.components.loss import chunked_cross_entropy
from framework.components.model import build_model, materialize
from framework.measure.saved_bytes import OUTSIDE, SavedTensorLedger
from launch.compose import compose_config
from planner.activations import LayerShape, layer_activation_bytes, outside_layers_bytes
from planner.plan import LayerPlan
from tests.plans import MODEL_PRESETS

PRESETS = MODEL_PRESETS
HEAD_DIM = 16
BATCH, SEQ = 2, 96
KEEP_ALL = LayerPlan(index=0, stage=0, offload_fraction=0.0, recompute="none",
                     recompute_fraction=0.0)  # fmt: skip


def scaled(name: str, tp: int):
    """The preset with its head and kv-head counts divided by 4 (ratios kept, at least tp
    kv heads), head_dim 16, ffn scaled with the width, 2 layers, a 512-token vocabulary."""
    m = compose_config([f"model={name}"]).model
    ratio = m.num_heads // m.num_kv_heads
    kv = max(m.num_kv_heads // 4, tp)
    heads = kv * ratio
    hidden = heads * HEAD_DIM
    ffn = -(-m.ffn_size * hidden // m.hidden_size // (8 * tp)) * 8 * tp
    return dataclasses.replace(
        m, hidden_size=hidden, num_heads=heads, num_kv_heads=kv, head_dim=None,
        ffn_size=ffn, num_layers=2, vocab_size=512,
    )  # fmt: skip


def one_tp_rank(model, tp: int):
    return dataclasses.replace(
        model,
        num_heads=model.num_heads // tp,
        num_kv_heads=model.num_kv_heads // tp,
        ffn_size=model.ffn_size // tp,
        head_dim=model.resolved_head_dim,
    )


def measure(model):
    net = materialize(build_model(model), "cpu", 0)
    tokens = torch.randint(0, model.vocab_size, (BATCH, SEQ))
    targets = torch.randint(0, model.vocab_size, (BATCH, SEQ))
    with SavedTensorLedger(net) as ledger:
        chunked_cross_entropy(net(tokens), net.output_weight(), targets, 64)
    return ledger


def within_one_percent(measured: int, predicted: int) -> bool:
    return abs(measured - predicted) <= 0.01 * predicted


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("tp", [1, 2])
def test_layer_bytes_match_measurement(name, tp):
    full = scaled(name, tp)
    ledger = measure(one_tp_rank(full, tp))
    shape = LayerShape.of(full, dtype_bytes=4, tp=tp)
    predicted = layer_activation_bytes(shape, BATCH, SEQ, KEEP_ALL).device_bytes
    per_layer = ledger.per_layer_bytes()
    for index in range(full.num_layers):
        assert within_one_percent(per_layer[index], predicted), (index, per_layer, predicted)


@pytest.mark.parametrize("name", PRESETS)
def test_outside_layers_bytes_match_measurement(name):
    model = scaled(name, 1)
    ledger = measure(model)
    measured = ledger.per_layer_bytes().get(OUTSIDE, 0) + ledger.shared_bytes()
    assert within_one_percent(measured, outside_layers_bytes(model, BATCH, SEQ, 4))


def test_tp_halves_the_sharded_tensors_only():
    """Under tp the layer input stays whole (replicated); q/k/v/o and the MLP halve."""
    model = scaled("llama2_7b", 2)
    one, two = LayerShape.of(model, 2, tp=1), LayerShape.of(model, 2, tp=2)
    assert two.input_bytes(SEQ) == one.input_bytes(SEQ)
    assert two.local_bytes(SEQ, False) < one.local_bytes(SEQ, False)
    assert 2 * two.ffn == one.ffn and 2 * two.q_heads == one.q_heads
