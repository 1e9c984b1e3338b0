"""A config.json that transformers writes, read through model.hf_config=, builds a model whose
logits match transformers' own (fp32, 1e-5), in both spellings of RoPE: rope_parameters
(transformers 5) and the older top-level rope_theta + rope_scaling."""

import json

import pytest
import torch

from configs.hf_weights import hf_to_memplan_name
from framework.components.model import Transformer, build_model
from launch.compose import compose_config
from tests.hf_models import FAMILY_NAMES, TINY
from tests.hf_models import build_hf_model as build_tiny

transformers = pytest.importorskip("transformers")

SEQ = 64  # well past original_max_position_embeddings=16, so llama3 scaling matters
TOLERANCE = 1e-5


def build_hf_model(family: str, tmp_path) -> tuple[torch.nn.Module, str]:
    """A tiny transformers model with random weights everywhere, and the config.json it saves."""
    return build_tiny(family, tmp_path), str(tmp_path / "config.json")


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
            name = hf_to_memplan_name(hf_name)
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


@pytest.mark.parametrize("family", FAMILY_NAMES)
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
