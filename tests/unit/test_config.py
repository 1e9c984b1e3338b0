"""Hydra composition against the typed schemas: presets, overrides and bad input."""

import json

import pytest

from configs import CONFIG_DIR
from configs.errors import ConfigError
from launch.compose import compose_config, dump_resolved, load_resolved

MODEL_PRESETS = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))
CLUSTER_PRESETS = sorted(p.stem for p in (CONFIG_DIR / "cluster").glob("*.yaml"))


def test_presets_required_by_the_design_exist():
    assert {"tiny", "llama3_2_1b", "llama2_7b", "llama2_13b", "llama3_8b", "llama3_70b",
            "mistral_7b"} <= set(MODEL_PRESETS)  # fmt: skip
    assert {"cpu", "h100_1x", "h100_8x", "a800_8x", "h100_64x"} <= set(CLUSTER_PRESETS)


@pytest.mark.parametrize("preset", MODEL_PRESETS)
def test_every_model_preset_composes(preset):
    cfg = compose_config([f"model={preset}"])
    assert cfg.model.name == preset
    assert cfg.model.num_heads % cfg.model.num_kv_heads == 0


@pytest.mark.parametrize("preset", CLUSTER_PRESETS)
def test_every_cluster_preset_composes(preset):
    cfg = compose_config([f"cluster={preset}"])
    assert cfg.cluster.name == preset
    assert cfg.cluster.world_size == cfg.cluster.num_nodes * cfg.cluster.gpus_per_node


def test_h100_64x_is_eight_nodes_of_eight():
    cluster = compose_config(["cluster=h100_64x"]).cluster
    assert (cluster.num_nodes, cluster.gpus_per_node, cluster.world_size) == (8, 8, 64)


def test_overrides_reach_the_typed_config():
    cfg = compose_config(["train.seq_len=512", "cluster.gpus_per_node=2", "logging.wandb=false"])
    assert cfg.train.seq_len == 512
    assert cfg.cluster.world_size == 2
    assert cfg.logging.wandb is False


@pytest.mark.parametrize(
    ("overrides", "key", "hint"),
    [
        (["model=nope"], "model=nope", "llama2_7b"),
        (["cluster=nope"], "cluster=nope", "h100_8x"),
        (["train.nope=1"], "train.nope", "seq_len"),
        (["+train.nope=1"], "train.nope", "seq_len"),
        (["nope=1"], "nope", "train"),
        (["train.steps=abc"], "train.steps", "Integer"),
        (["model.hidden_size=1.5"], "model.hidden_size", "Integer"),
        (["logging.wandb=maybe"], "logging.wandb", "bool"),
        (["train.dtype=fp16"], "train.dtype", "bf16"),
        (["checkpoint.resume=sometimes"], "checkpoint.resume", "auto"),
        (["model.num_kv_heads=3"], "model.num_kv_heads", "divisible"),
        (["model.num_heads=6", "model.num_kv_heads=3"], "model.num_heads", "hidden_size=128"),
        (["train.seq_len=0"], "train.seq_len", ">= 1"),
        (["train.seq_len"], "train.seq_len", "key=value"),
        (["model.hf_config=/no/such/config.json"], "model.hf_config", "cannot read"),
    ],
)
def test_bad_input_names_the_key_on_one_line(overrides, key, hint):
    with pytest.raises(ConfigError) as raised:
        compose_config(overrides)
    message = str(raised.value)
    assert message.startswith(key), message
    assert hint in message
    assert "\n" not in message


def test_resolved_yaml_round_trips(tmp_path):
    cfg = compose_config(["model=llama3_2_1b", "train.seq_len=8192"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_resolved(cfg))
    assert load_resolved(str(path)) == cfg


def test_resolved_yaml_with_unknown_key_is_rejected(tmp_path):
    cfg = compose_config([])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_resolved(cfg) + "surprise: 1\n")
    with pytest.raises(ConfigError, match="surprise"):
        load_resolved(str(path))


def _write_hf(tmp_path, **fields):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(fields))
    return str(path)


LLAMA32_1B_HF = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 2048,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 8192,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "max_position_embeddings": 131072,
    "attention_bias": False,
    "head_dim": 64,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
}


def test_hf_llama_config_matches_the_preset(tmp_path):
    from_hf = compose_config([f"model.hf_config={_write_hf(tmp_path, **LLAMA32_1B_HF)}"]).model
    preset = compose_config(["model=llama3_2_1b"]).model
    for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                "ffn_size", "rope_theta", "rope_scaling", "rope_scaling_factor",
                "tie_embeddings", "qkv_bias", "out_bias"):  # fmt: skip
        assert getattr(from_hf, key) == getattr(preset, key), key


def test_hf_qwen2_has_qkv_bias_only(tmp_path):
    path = _write_hf(
        tmp_path, model_type="qwen2", vocab_size=151936, hidden_size=896, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
        tie_word_embeddings=True, rope_theta=1000000.0,
    )  # fmt: skip
    model = compose_config([f"model.hf_config={path}"]).model
    assert (model.qkv_bias, model.out_bias, model.tie_embeddings) == (True, False, True)
    assert model.num_kv_heads == 2 and model.resolved_head_dim == 64


def test_hf_mistral_and_explicit_overrides_win(tmp_path):
    path = _write_hf(
        tmp_path, model_type="mistral", vocab_size=32000, hidden_size=4096,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336,
    )  # fmt: skip
    model = compose_config([f"model.hf_config={path}", "model.num_layers=2"]).model
    assert model.num_layers == 2 and model.num_kv_heads == 8 and model.ffn_size == 14336


@pytest.mark.parametrize(
    ("fields", "hint"),
    [
        ({"model_type": "gpt2"}, "model_type"),
        ({"model_type": "llama", "hidden_size": 64}, "num_attention_heads"),
        ({**LLAMA32_1B_HF, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ],
)
def test_bad_hf_config_is_a_config_error(tmp_path, fields, hint):
    with pytest.raises(ConfigError, match=hint):
        compose_config([f"model.hf_config={_write_hf(tmp_path, **fields)}"])


def test_hf_config_that_is_not_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        compose_config([f"model.hf_config={path}"])
