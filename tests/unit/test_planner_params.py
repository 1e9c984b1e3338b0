"""Parameter counts and model-state bytes: exact against the runtime's model, and the ZeRO
paper's table (16Psi, 4Psi+12Psi/Nd, 2Psi+14Psi/Nd, 16Psi/Nd) reproduced to the byte."""

import dataclasses

import pytest

from framework.components.model import build_model, count_parameters
from launch.compose import compose_config
from planner.memory import zero_table_bytes
from planner.params import model_state_bytes, param_counts, total_params
from tests.plans import MODEL_PRESETS

PRESETS = MODEL_PRESETS


@pytest.mark.parametrize("name", PRESETS)
def test_total_params_equal_the_model_on_meta(name):
    model = compose_config([f"model={name}"]).model
    assert total_params(model) == count_parameters(build_model(model))


@pytest.mark.parametrize(
    "change",
    [
        {"qkv_bias": True},
        {"qkv_bias": True, "out_bias": True},
        {"tie_embeddings": True},
        {"head_dim": 48},
    ],
)
def test_variants_equal_the_model_on_meta(change):
    model = dataclasses.replace(compose_config([]).model, **change)
    assert total_params(model) == count_parameters(build_model(model))


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_tp_shard_equals_one_rank_of_the_layer(tp):
    """A layer with heads/tp, kv_heads/tp and ffn/tp (same head_dim) is one TP rank's layer;
    norms (and the output bias) are replicated."""
    full = compose_config(["model=llama3_70b"]).model
    full = dataclasses.replace(full, out_bias=True, qkv_bias=True)
    rank = dataclasses.replace(
        full,
        num_heads=full.num_heads // tp,
        num_kv_heads=full.num_kv_heads // tp,
        ffn_size=full.ffn_size // tp,
        head_dim=full.resolved_head_dim,
        num_layers=1,
    )
    layer = build_model(rank).layers["0"]
    assert param_counts(full, tp).layer == count_parameters(layer)


def test_tied_embedding_is_held_twice_only_across_stages():
    model = compose_config(["model=llama3_2_1b"]).model
    assert model.tie_embeddings
    assert param_counts(model, pp=1).output == 0
    assert param_counts(model, pp=2).output == model.vocab_size * model.hidden_size


@pytest.mark.parametrize("psi", [7_500_000_000, 6_738_415_616])
@pytest.mark.parametrize("nd", [1, 8, 64])
def test_zero_table_mixed_precision(psi, nd):
    assert psi % nd == 0
    assert zero_table_bytes(psi, nd, 0) == 16 * psi
    assert zero_table_bytes(psi, nd, 1) == 4 * psi + 12 * psi // nd
    assert zero_table_bytes(psi, nd, 2) == 2 * psi + 14 * psi // nd
    assert zero_table_bytes(psi, nd, 3) == 16 * psi // nd


def test_zero_table_paper_example():
    """ZeRO paper, Figure 1: 7.5B parameters on 64 GPUs: 120 GB, 31.4 GB, 16.6 GB, 1.88 GB."""
    psi, nd = 7_500_000_000, 64
    expected_gb = [120.0, 31.4, 16.6, 1.88]
    for stage, gb in enumerate(expected_gb):
        assert zero_table_bytes(psi, nd, stage) / 1e9 == pytest.approx(gb, rel=0.01)


def test_fp32_states_split_params_grads_adam():
    states = model_state_bytes(1000, 4, 0, "fp32")
    assert (states.params, states.grads, states.optimizer) == (4000, 4000, 8000)
    sharded = model_state_bytes(1000, 4, 3, "fp32")
    assert (sharded.params, sharded.grads, sharded.optimizer) == (1000, 1000, 2000)
    assert model_state_bytes(1000, 4, 1, "bf16").optimizer == 3000
    assert model_state_bytes(1001, 4, 3, "bf16").params == 2 * 251  # padded shard
