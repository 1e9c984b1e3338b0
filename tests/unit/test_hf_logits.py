"""A config.json that transformers writes, read through model.hf_config=, builds a model whose
logits match transformers' own (fp32, 1e-5), in both spellings of RoPE: rope_parameters
(transformers 5) and the older top-level rope_theta + rope_scaling."""

import json

import pytest
import torch

from framework.components.model import Transformer, build_model
from launch.compose import compose_config

transformers = pytest.importorskip("transformers")

SEQ = 64  # well past original_max_position_embeddings=16, so llama3 scaling matters
TOLERANCE = 1e-5
TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
)  # fmt: skip
LLAMA3 = {
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
}  # fmt: skip
FAMILIES = {
    "llama_llama3": (transformers.LlamaConfig, dict(rope_parameters=LLAMA3)),
    "qwen2_bias_tied": (
        transformers.Qwen2Config,
        dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=True),
    ),
    "mistral": (
        transformers.MistralConfig,
        dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6}, sliding_window=None),
    ),
}
# memplan's name for each per-layer Hugging Face module
LAYER_NAMES = {
    "input_layernorm": "attention_norm",
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
}


def memplan_name(hf_name: str) -> str:
    """model.layers.1.self_attn.q_proj.bias -> layers.1.attention.wq.bias, etc."""
    top = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
           "lm_head.weight": "output.weight"}  # fmt: skip
    if hf_name in top:
        return top[hf_name]
    _, _, index, rest = hf_name.split(".", 3)
    module, leaf = rest.rsplit(".", 1)
    return f"layers.{index}.{LAYER_NAMES[module]}.{leaf}"


def build_hf_model(family: str, tmp_path) -> tuple[torch.nn.Module, str]:
    """A tiny transformers model with random weights everywhere (biases and norms too), and the
    config.json it saves."""
    config_class, extra = FAMILIES[family]
    config = config_class(**TINY, **extra, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            base = 1.0 if name.endswith("norm.weight") else 0.0
            param.copy_(base + 0.1 * torch.randn_like(param))
    model.save_pretrained(tmp_path)
    return model, str(tmp_path / "config.json")


def rewrite_in_older_spelling(path: str) -> None:
    """rope_parameters -> top-level rope_theta + rope_scaling (null for the default type)."""
    with open(path) as f:
        raw = json.load(f)
    rope = raw.pop("rope_parameters")
    raw["rope_theta"] = rope.pop("rope_theta")
    raw["rope_scaling"] = None if rope["rope_type"] == "default" else rope
    with open(path, "w") as f:
        json.dump(raw, f)


def memplan_logits(hf_model: torch.nn.Module, overrides: list[str], tokens) -> torch.Tensor:
    model: Transformer = build_model(compose_config(overrides).model, device="cpu")
    ours = dict(model.named_parameters())
    copied = set()
    with torch.no_grad():
        for hf_name, tensor in hf_model.state_dict().items():
            name = memplan_name(hf_name)
            if name == "output.weight" and model.output is None:
                assert torch.equal(tensor, hf_model.model.embed_tokens.weight)  # really tied
                continue
            ours[name].copy_(tensor)
            copied.add(name)
    assert copied == set(ours), set(ours) ^ copied
    with torch.no_grad():
        return model(tokens) @ model.output_weight().T


def max_relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


@pytest.fixture(params=["rope_parameters", "rope_theta+rope_scaling"])
def spelling(request) -> str:
    return request.param


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers(family, spelling, tmp_path):
    hf_model, path = build_hf_model(family, tmp_path)
    if spelling != "rope_parameters":
        rewrite_in_older_spelling(path)
        # transformers itself reads the rewritten file as the same model
        reread = transformers.AutoConfig.from_pretrained(tmp_path)
        assert reread.rope_parameters == hf_model.config.rope_parameters
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, TINY["vocab_size"], (2, SEQ), generator=generator)
    with torch.no_grad():
        reference = hf_model(tokens).logits

    overrides = [f"model.hf_config={path}"]
    assert max_relative_error(memplan_logits(hf_model, overrides, tokens), reference) < TOLERANCE

    # the tolerance would catch the misreading of issue 19 (theta 10000, no scaling)
    misread = [*overrides, "model.rope_theta=10000.0", "model.rope_scaling=none"]
    assert max_relative_error(memplan_logits(hf_model, misread, tokens), reference) > 1e-3


def test_llama3_scaling_alone_is_visible_in_the_logits(tmp_path):
    hf_model, path = build_hf_model("llama_llama3", tmp_path)
    tokens = torch.arange(SEQ)[None] % TINY["vocab_size"]
    with torch.no_grad():
        reference = hf_model(tokens).logits
    unscaled = [f"model.hf_config={path}", "model.rope_scaling=none"]
    assert max_relative_error(memplan_logits(hf_model, unscaled, tokens), reference) > 1e-3
