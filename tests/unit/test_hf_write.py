"""config.json written for a memplan model reads back (configs/hf.py) as the same model, for
every preset and each family, and transformers reads the same dimensions."""

import json

import pytest

from configs.errors import ConfigError
from configs.hf import read_hf_config
from configs.hf_write import export_model_type, hf_config_json
from launch.compose import compose_config
from tests.plans import MODEL_PRESETS

transformers = pytest.importorskip("transformers")


def written_and_read(cfg, model_type, tmp_path) -> dict:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(hf_config_json(cfg, model_type, "float32")))
    return read_hf_config(str(tmp_path))


@pytest.mark.parametrize("preset", MODEL_PRESETS)
def test_every_preset_round_trips(preset, tmp_path):
    cfg = compose_config([f"model={preset}"]).model
    model_type = export_model_type(cfg, None)
    read = written_and_read(cfg, model_type, tmp_path)
    for key, value in read.items():
        if key != "name":
            assert getattr(cfg, key) == value, key
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert hf.model_type == model_type
    assert (hf.hidden_size, hf.num_hidden_layers, hf.intermediate_size) == (
        cfg.hidden_size, cfg.num_layers, cfg.ffn_size,
    )  # fmt: skip
    assert hf.num_key_value_heads == cfg.num_kv_heads


@pytest.mark.parametrize(
    "biases, source, expected",
    [
        ((False, False), "mistral", "mistral"),
        ((False, False), None, "llama"),
        ((True, False), "llama", "qwen2"),
        ((True, True), "mistral", "llama"),
    ],
)
def test_family_follows_the_bias_layout(biases, source, expected, tmp_path):
    qkv, out = biases
    cfg = compose_config([f"model.qkv_bias={qkv}", f"model.out_bias={out}"]).model
    assert export_model_type(cfg, source) == expected
    read = written_and_read(cfg, expected, tmp_path)
    assert (read["qkv_bias"], read["out_bias"]) == biases


def test_output_bias_alone_has_no_family():
    cfg = compose_config(["model.out_bias=true"]).model
    with pytest.raises(ConfigError, match=r"^model\.out_bias: "):
        export_model_type(cfg, None)


def test_a_checkpoint_without_memplans_config_is_one_error(tmp_path):
    from framework.components.hf_export import checkpoint_model_config

    (tmp_path / "config.json").write_text(json.dumps({"something": "else"}))
    with pytest.raises(ConfigError, match=r"^export\.checkpoint: .*has no model node"):
        checkpoint_model_config(tmp_path)
