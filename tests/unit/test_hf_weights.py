"""model.init=hf loads a Hugging Face directory that transformers wrote (one file or several
shards): memplan's logits equal transformers' (fp32, 1e-5) and so does the loss on the same
tokens; a damaged or mismatched directory is one ConfigError naming the file and tensor."""

import json

import pytest
import torch

from configs.errors import ConfigError
from framework.components.loss import chunked_cross_entropy
from framework.components.model import build_model
from framework.components.weights import initialize_weights
from launch.compose import compose_config
from tests.hf_models import FAMILY_NAMES, TINY, build_hf_model

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-5


def load_memplan(directory, *overrides: str):
    cfg = compose_config([f"model.hf_config={directory}", "model.init=hf", *overrides]).model
    model = build_model(cfg).to_empty(device="cpu")
    initialize_weights(model, cfg, seed=0)
    return model


def tokens(seq: int = 48) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, TINY["vocab_size"], (2, seq), generator=generator)


@pytest.mark.parametrize("shards", [None, "40KB"], ids=["one_file", "sharded"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_loaded_weights_give_transformers_logits_and_loss(family, shards, tmp_path):
    hf_model = build_hf_model(family, tmp_path, max_shard_size=shards)
    if shards:
        assert (tmp_path / "model.safetensors.index.json").is_file()
        assert len(list(tmp_path.glob("*.safetensors"))) > 2
    ours = load_memplan(tmp_path)
    batch = tokens()
    with torch.no_grad():
        reference = hf_model(batch).logits
        logits = ours(batch) @ ours.output_weight().T
        error = ((logits - reference).abs().max() / reference.abs().max()).item()
        assert error < TOLERANCE
        hf_loss = hf_model(input_ids=batch, labels=batch).loss
        loss = chunked_cross_entropy(ours(batch[:, :-1]), ours.output_weight(), batch[:, 1:], 4096)
    assert loss.item() == pytest.approx(hf_loss.item(), rel=TOLERANCE)


def test_random_init_is_not_the_checkpoint(tmp_path):
    """The loaded weights are the file's, not the seeded random ones."""
    build_hf_model("llama_llama3", tmp_path)
    loaded = load_memplan(tmp_path)
    random = load_memplan(tmp_path, "model.init=random")
    assert not torch.equal(
        loaded.layers["0"].attention.wq.weight, random.layers["0"].attention.wq.weight
    )


def _error(directory, *overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        compose_config([f"model.hf_config={directory}", "model.init=hf", *overrides])
    return str(info.value)


def test_missing_shard_names_the_file(tmp_path):
    build_hf_model("mistral", tmp_path, max_shard_size="40KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    message = _error(tmp_path)
    assert message.startswith("model.hf_config:") and victim.name in message
    assert "missing" in message


def test_shape_mismatch_names_file_and_tensor(tmp_path):
    build_hf_model("llama_llama3", tmp_path)
    message = _error(tmp_path, "model.ffn_size=128")
    assert "model.safetensors" in message and "mlp.gate_proj.weight" in message
    assert "[96, 64]" in message and "[128, 64]" in message


def test_missing_tensor_and_extra_layers_are_named(tmp_path):
    build_hf_model("llama_llama3", tmp_path)
    fewer = _error(tmp_path, "model.num_layers=1")
    assert "model.layers.1." in fewer and "no place" in fewer
    more = _error(tmp_path, "model.num_layers=3")
    assert "has no tensor model.layers.2." in more


def test_unsupported_architecture_and_directory_without_weights(tmp_path):
    gpt2 = tmp_path / "gpt2"
    transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(gpt2)
    message = _error(gpt2)
    assert "model_type='gpt2'" in message and "config.json" in message
    config_only = tmp_path / "config_only"
    build_hf_model("mistral", tmp_path / "full")
    config_only.mkdir()
    (config_only / "config.json").write_text((tmp_path / "full" / "config.json").read_text())
    assert "holds no *.safetensors" in _error(config_only)
    with pytest.raises(ConfigError, match=r"^model\.init: hf needs model\.hf_config"):
        compose_config(["model.init=hf"])


def test_not_a_safetensors_file_and_a_wrong_index(tmp_path):
    build_hf_model("mistral", tmp_path, max_shard_size="40KB")
    first = sorted(tmp_path.glob("model-*.safetensors"))[0]
    first.write_bytes(b"not a safetensors file at all")
    assert "is not a safetensors file" in _error(tmp_path)
    build_hf_model("mistral", tmp_path / "again", max_shard_size="40KB")
    index_path = tmp_path / "again" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = "model.norm.weight"
    files = sorted(set(index["weight_map"].values()))
    index["weight_map"][name] = next(f for f in files if f != index["weight_map"][name])
    index_path.write_text(json.dumps(index))
    message = _error(tmp_path / "again")
    assert name in message and "lacks it" in message
