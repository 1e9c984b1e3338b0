"""Measured per-layer bytes (device-resident, host-offloaded, recomputed) of every preset,
scaled down, under a table of policy mixes, against planner.activations' prediction: the
plan's memory numbers are only as good as this agreement (+/-2% required)."""

import dataclasses

import pytest
import torch

from framework.components.loss import chunked_cross_entropy
from framework.components.model import build_model, materialize
from framework.measure.profile import per_rank_model, scale_down
from launch.compose import compose_config
from offload import apply_activation_plan
from planner.activations import LayerShape, layer_activation_bytes
from planner.plan import LayerPlan

PRESETS = [
    "tiny",
    "llama3_2_1b",
    "llama2_7b",
    "llama2_13b",
    "llama3_8b",
    "llama3_70b",
    "mistral_7b",
]

# (offload_fraction, recompute, recompute_fraction, anchor_offload_fraction)
MIXES = {
    "none": (0.0, "none", 0.0, 0.0),
    "alpha": (0.5, "none", 0.0, 0.0),
    "rho": (0.0, "none", 0.5, 0.0),
    "beta": (0.0, "none", 0.0, 1.0),
    "beta_half": (0.0, "none", 0.0, 0.5),
    "alpha_rho": (0.25, "none", 0.5, 0.0),
    "alpha_rho_beta": (0.3, "none", 0.3, 0.5),
    "memo": (0.4, "none", 0.6, 1.0),
    "all_host": (1.0, "none", 0.0, 1.0),
    "selective": (0.0, "selective", 0.0, 0.0),
    "selective_mix": (0.25, "selective", 0.25, 0.5),
    "full": (0.0, "full", 0.0, 0.0),
    "full_beta": (0.0, "full", 0.0, 1.0),
}
TOLERANCE = 0.02


def _within(measured: int, predicted: int) -> bool:
    if predicted == 0:
        return measured == 0
    return abs(measured - predicted) <= TOLERANCE * predicted


def _preset(name: str, tp: int = 1):
    model = compose_config([f"model={name}"]).model
    return dataclasses.replace(scale_down(per_rank_model(model, tp)), num_layers=2)


def _measure(cfg, policies, batch, seq):
    model = materialize(build_model(cfg), "cpu", 0)
    runtime = apply_activation_plan(model.layers.values(), policies)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=generator)
    loss = chunked_cross_entropy(model(tokens), model.output_weight(), tokens, 64)
    stats = runtime.layer_stats()
    loss.backward()  # the saved tensors are consumed: the policies really work end to end
    return stats


@pytest.mark.parametrize("preset", PRESETS)
def test_measured_bytes_match_the_prediction_for_every_mix(preset):
    cfg = _preset(preset)
    names = list(MIXES)
    shape = LayerShape.of(cfg, 4)
    for position, name in enumerate(names):
        pair = [name, names[(position + 1) % len(names)]]  # different policies per layer
        policies = [LayerPlan(i, 0, *_fields(MIXES[mix])) for i, mix in enumerate(pair)]
        batch, seq = (1, 96) if position % 3 == 0 else (2, 64)
        stats = _measure(cfg, policies, batch, seq)
        for policy, mix in zip(policies, pair, strict=True):
            predicted = layer_activation_bytes(shape, batch, seq, policy)
            measured = stats[policy.index]
            context = f"{preset} {mix} layer {policy.index}: {measured} vs {predicted}"
            assert _within(measured.device_bytes, predicted.device_bytes), context
            assert _within(measured.host_bytes, predicted.host_bytes), context
            assert _within(measured.recomputed_bytes, predicted.recomputed_bytes), context


def _fields(mix):
    alpha, recompute, rho, beta = mix
    return alpha, recompute, rho, beta


def test_tensor_parallel_ranks_hold_the_per_rank_prediction():
    model = compose_config(["model=llama3_8b"]).model
    rank = per_rank_model(model, 4)
    assert (rank.num_heads, rank.num_kv_heads, rank.ffn_size) == (8, 2, 3584)
    assert LayerShape.of(rank, 2) == LayerShape.of(model, 2, tp=4)
    cfg = dataclasses.replace(scale_down(rank), num_layers=2)
    policies = [LayerPlan(0, 0, 0.3, "none", 0.3, 0.5), LayerPlan(1, 0, 0.0, "selective", 0.5)]
    stats = _measure(cfg, policies, 2, 64)
    for policy in policies:
        predicted = layer_activation_bytes(LayerShape.of(cfg, 4), 2, 64, policy)
        assert stats[policy.index].device_bytes == predicted.device_bytes
        assert stats[policy.index].host_bytes == predicted.host_bytes


def test_scaled_presets_keep_their_shape_ratios():
    for name in PRESETS:
        model = compose_config([f"model={name}"]).model
        small = scale_down(model)
        assert small.num_heads <= max(8, model.num_heads // model.num_kv_heads)
        group, small_group = (
            model.num_heads // model.num_kv_heads,
            small.num_heads // small.num_kv_heads,
        )
        assert small_group == group, name
        ffn_ratio, small_ratio = (
            model.ffn_size / model.hidden_size,
            small.ffn_size / small.hidden_size,
        )
        assert small_ratio == pytest.approx(ffn_ratio, rel=0.1), name
