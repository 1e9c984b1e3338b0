"""The Llama-family decoder: exact parameter counts, custom ops, RoPE, deterministic init."""

import dataclasses
import math

import pytest
import torch

from framework.components.model import build_model, count_parameters, initial_value, materialize
from framework.components.ops import apply_rope, rms_norm, swiglu
from framework.components.rope import rope_inverse_frequencies
from launch.compose import compose_config

REAL_PARAMETER_COUNTS = {
    "llama3_2_1b": 1_235_814_400,
    "llama2_7b": 6_738_415_616,
    "llama2_13b": 13_015_864_320,
    "llama3_8b": 8_030_261_248,
    "llama3_70b": 70_553_706_496,
    "mistral_7b": 7_241_732_096,
}


@pytest.mark.parametrize(("preset", "expected"), REAL_PARAMETER_COUNTS.items())
def test_parameter_count_equals_the_real_model_on_meta(preset, expected):
    model = build_model(compose_config([f"model={preset}"]).model)
    assert next(model.parameters()).device.type == "meta"
    assert count_parameters(model) == expected


def test_attention_biases_add_exactly_their_widths():
    base = compose_config([]).model
    plain = count_parameters(build_model(base))
    qkv = count_parameters(build_model(dataclasses.replace(base, qkv_bias=True)))
    both = count_parameters(build_model(dataclasses.replace(base, qkv_bias=True, out_bias=True)))
    kv_width = base.num_kv_heads * base.resolved_head_dim
    per_layer_qkv = base.hidden_size + 2 * kv_width
    assert qkv - plain == base.num_layers * per_layer_qkv
    assert both - qkv == base.num_layers * base.hidden_size


def test_tied_embeddings_share_the_output_weight():
    cfg = dataclasses.replace(compose_config([]).model, tie_embeddings=True)
    model = materialize(build_model(cfg), "cpu", 0)
    assert model.output is None
    assert model.output_weight() is model.tok_embeddings.weight


def test_forward_shapes_and_gqa():
    cfg = compose_config([]).model
    model = materialize(build_model(cfg), "cpu", 0)
    tokens = torch.randint(0, cfg.vocab_size, (3, 17))
    hidden = model(tokens)
    assert hidden.shape == (3, 17, cfg.hidden_size)
    assert cfg.num_kv_heads < cfg.num_heads
    assert model.layers["0"].attention.wk.weight.shape[0] == cfg.num_kv_heads * 32


def test_causal_attention_equals_explicit_softmax():
    cfg = compose_config([]).model
    layer = materialize(build_model(cfg), "cpu", 0).layers["0"]
    q = torch.randn(2, 9, 4, 32)
    k = torch.randn(2, 9, 2, 32)
    v = torch.randn(2, 9, 2, 32)
    out = layer.attention_core(q, k, v)
    k_rep = k.repeat_interleave(2, dim=2)
    v_rep = v.repeat_interleave(2, dim=2)
    scores = torch.einsum("bshd,bthd->bhst", q, k_rep) / math.sqrt(32)
    scores = scores.masked_fill(torch.ones(9, 9).triu(1).bool(), float("-inf"))
    expected = torch.einsum("bhst,bthd->bshd", scores.softmax(-1), v_rep).flatten(2)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_rms_norm_and_swiglu_gradients_are_exact():
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-6), (x, w))
    a = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (a, b))
    torch.testing.assert_close(swiglu(a, b), torch.nn.functional.silu(a) * b)


def test_rms_norm_matches_the_definition():
    x = torch.randn(4, 16)
    w = torch.randn(16)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(rms_norm(x, w, 1e-5), expected)


def test_rope_rotates_pairs_and_preserves_norms():
    x = torch.randn(1, 6, 2, 8)
    angles = torch.rand(6, 4)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    out = apply_rope(x, cos, sin)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))
    # position p rotates the (i, i + d/2) pair by angle[p, i]
    rotated = x[0, 2, 0, 1] * cos[2, 1] - x[0, 2, 0, 5] * sin[2, 1]
    torch.testing.assert_close(out[0, 2, 0, 1], rotated)


def test_llama3_rope_scaling_keeps_high_and_slows_low_frequencies():
    cfg = compose_config(["model=llama3_2_1b"]).model
    scaled = rope_inverse_frequencies(cfg)
    plain = rope_inverse_frequencies(dataclasses.replace(cfg, rope_scaling="none"))
    torch.testing.assert_close(scaled[0], plain[0])  # highest frequency untouched
    torch.testing.assert_close(scaled[-1], plain[-1] / cfg.rope_scaling_factor)
    assert torch.all(scaled <= plain + 1e-12)


def test_init_is_deterministic_and_independent_of_sharding():
    cfg = compose_config([]).model
    first = materialize(build_model(cfg), "cpu", 7).state_dict()
    second = materialize(build_model(cfg), "cpu", 7).state_dict()
    other_seed = materialize(build_model(cfg), "cpu", 8).state_dict()
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name
    assert not torch.equal(first["layers.0.attention.wq.weight"],
                           other_seed["layers.0.attention.wq.weight"])  # fmt: skip
    # a parameter's value depends only on its name and the seed, never on its neighbours
    direct = initial_value("layers.0.attention.wq.weight", (128, 128), cfg, 7)
    assert torch.equal(direct, first["layers.0.attention.wq.weight"])
    assert torch.equal(first["layers.0.attention_norm.weight"], torch.ones(128))
