"""Reading a Hugging Face config.json (configs/hf.py) through model.hf_config=: both RoPE
spellings, and per key what memplan refuses (exit 2), warns about or reads."""

import json
import logging

import pytest

from configs.errors import ConfigError
from launch.cli import main
from launch.compose import compose_config

BASE = {
    "model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 128, "rms_norm_eps": 1e-6,
}  # fmt: skip
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}  # fmt: skip
ROPE_FIELDS = ("rope_theta", "rope_scaling", "rope_scaling_factor", "rope_low_freq_factor",
               "rope_high_freq_factor", "rope_original_max_positions")  # fmt: skip


def write(tmp_path, **fields) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**BASE, **fields}))
    return str(path)


def read(path: str, *overrides: str):
    return compose_config([f"model.hf_config={path}", *overrides]).model


def rope(model) -> tuple:
    return tuple(getattr(model, field) for field in ROPE_FIELDS)


def test_both_rope_spellings_read_the_same(tmp_path):
    new = read(write(tmp_path, rope_parameters={**LLAMA3, "rope_theta": 500000.0}))
    assert rope(new) == (500000.0, "llama3", 8.0, 1.0, 4.0, 16)
    old = read(write(tmp_path, rope_theta=500000.0, rope_scaling=LLAMA3))
    assert rope(old) == rope(new)
    # "type" is the older name of "rope_type"
    oldest = {**LLAMA3, "type": LLAMA3["rope_type"]}
    del oldest["rope_type"]
    assert rope(read(write(tmp_path, rope_theta=500000.0, rope_scaling=oldest))) == rope(new)


def test_rope_defaults_follow_transformers(tmp_path):
    assert rope(read(write(tmp_path)))[:2] == (10000.0, "none")
    default = {"rope_type": "default", "rope_theta": 1e6}
    assert rope(read(write(tmp_path, rope_parameters=default)))[:2] == (1e6, "none")
    # an absent original context length is max_position_embeddings, as in transformers
    without = {key: value for key, value in LLAMA3.items() if "original" not in key}
    assert read(write(tmp_path, rope_scaling=without)).rope_original_max_positions == 128


def test_no_rope_setting_of_the_preset_leaks_through(tmp_path):
    path = write(tmp_path, model_type="qwen2", rope_parameters={"rope_theta": 1e6})
    model = read(path, "model=llama3_2_1b")  # a preset with llama3 scaling
    assert (model.rope_scaling, model.rope_theta, model.qkv_bias) == ("none", 1e6, True)


def test_absent_keys_take_the_family_defaults_of_transformers(tmp_path):
    absent = {key: value for key, value in BASE.items() if key != "rms_norm_eps"}
    path = tmp_path / "config.json"
    wide = {"num_attention_heads": 32, "hidden_size": 2048, "model_type": "qwen2"}
    path.write_text(json.dumps({**absent, **wide, "num_key_value_heads": None}))
    model = read(str(path))
    assert (model.norm_eps, model.num_kv_heads) == (1e-6, 32)  # null: as many as query heads
    del absent["num_key_value_heads"]
    path.write_text(json.dumps({**absent, **wide}))
    assert read(str(path)).num_kv_heads == 32  # absent: Qwen2Config's default


@pytest.mark.parametrize(
    ("fields", "first", "second"),
    [
        ({"rope_theta": 1e4, "rope_parameters": {"rope_theta": 5e5}}, "rope_theta=",
         "rope_parameters.rope_theta="),
        ({"rope_parameters": LLAMA3, "rope_scaling": {**LLAMA3, "factor": 32.0}},
         "rope_parameters.factor=8.0", "rope_scaling.factor=32.0"),
        ({"rope_parameters": {"rope_type": "default"}, "rope_scaling": LLAMA3},
         "rope_parameters.rope_type=", "rope_scaling.rope_type="),
        ({"rope_scaling": {**LLAMA3, "type": "default"}}, "rope_scaling.rope_type=",
         "rope_scaling.type="),
        ({"rope_scaling": LLAMA3, "original_max_position_embeddings": 32},
         "original_max_position_embeddings=32", "rope_scaling.original_max_position_embeddings"),
    ],
)  # fmt: skip
def test_disagreeing_spellings_name_both_keys(tmp_path, fields, first, second):
    with pytest.raises(ConfigError) as raised:
        read(write(tmp_path, **fields))
    message = str(raised.value)
    assert first in message and second in message and "disagree" in message, message


@pytest.mark.parametrize("kind", ["yarn", "dynamic", "linear", "longrope", "su"])
@pytest.mark.parametrize("spelling", ["rope_parameters", "rope_scaling"])
def test_rope_types_memplan_lacks_are_refused(tmp_path, kind, spelling):
    with pytest.raises(ConfigError) as raised:
        read(write(tmp_path, **{spelling: {"rope_type": kind, "factor": 4.0}}))
    message = str(raised.value)
    assert f'{spelling}.rope_type="{kind}"' in message and "default, llama3" in message


@pytest.mark.parametrize(
    ("fields", "hint"),
    [
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
        ({"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.25}},
         "rope_parameters.partial_rotary_factor=0.25"),
        ({"rope_parameters": {"rope_type": "default", "factor": 2.0}}, "does not read: factor"),
        ({"rope_parameters": {"full_attention": {"rope_type": "default"}}}, "full_attention"),
        ({"hidden_act": "gelu"}, 'hidden_act="gelu"'),
        ({"mlp_bias": True}, "mlp_bias=true"),
        ({"model_type": "mistral", "sliding_window": 4096}, "sliding_window=4096"),
        ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 32,
          "max_window_layers": 1}, "use_sliding_window=true"),
        ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 32,
          "layer_types": ["full_attention", "sliding_attention"]}, "use_sliding_window=true"),
    ],
)  # fmt: skip
def test_keys_that_change_the_function_are_refused(tmp_path, fields, hint):
    with pytest.raises(ConfigError) as raised:
        read(write(tmp_path, **fields))
    message = str(raised.value)
    assert message.startswith("model.hf_config: ") and hint in message, message


@pytest.mark.parametrize(
    "fields",
    [
        {"partial_rotary_factor": 1.0, "hidden_act": "swish", "pretraining_tp": 2},
        {"model_type": "mistral", "sliding_window": None},
        {"model_type": "qwen2", "use_sliding_window": False, "sliding_window": 32},
        {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 32,
         "max_window_layers": 2},
        {"sliding_window": 32},  # transformers' Llama has no sliding window either
    ],
)  # fmt: skip
def test_keys_that_change_nothing_pass_quietly(tmp_path, fields, caplog):
    with caplog.at_level(logging.WARNING, logger="configs.hf"):
        read(write(tmp_path, **fields))
    assert not caplog.records


@pytest.mark.parametrize(
    ("fields", "hint", "model_bias"),
    [
        ({"attention_dropout": 0.1}, "attention_dropout=0.1 in", (False, False)),
        ({"model_type": "mistral", "sliding_window": None, "attention_bias": True},
         "attention_bias=true in", (False, False)),
        ({"model_type": "qwen2", "attention_bias": False}, "attention_bias=false in",
         (True, False)),
        ({"model_type": "mistral"}, "has no sliding_window", (False, False)),
    ],
)  # fmt: skip
def test_ignored_keys_get_one_warning_line(tmp_path, fields, hint, model_bias, caplog):
    path = write(tmp_path, **fields)
    with caplog.at_level(logging.WARNING, logger="configs.hf"):
        model = read(path)
    (record,) = caplog.records
    message = record.getMessage()
    assert message.startswith("model.hf_config: ") and hint in message and path in message
    assert "\n" not in message
    assert (model.qkv_bias, model.out_bias) == model_bias


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        ({"rope_theta": "abc"}, 'rope_theta="abc"'),
        ({"rope_theta": float("nan")}, "rope_theta=NaN"),
        ({"rope_scaling": {k: v for k, v in LLAMA3.items() if k != "factor"}},
         "'rope_scaling.factor'"),
        ({"rope_scaling": [LLAMA3]}, "rope_scaling=["),
        ({"rope_parameters": "llama3"}, 'rope_parameters="llama3"'),
        ({"rope_scaling": {**LLAMA3, "high_freq_factor": 1.0}}, "rope_scaling.high_freq_factor"),
        ({"rope_scaling": {**LLAMA3, "factor": None}}, "rope_scaling.factor=null"),
        ({"rms_norm_eps": None}, "rms_norm_eps=null"),
        ({"tie_word_embeddings": "yes"}, 'tie_word_embeddings="yes"'),
        ({"vocab_size": "128"}, 'vocab_size="128"'),
        ({"num_key_value_heads": 0}, "num_key_value_heads=0"),
        ({"head_dim": 16.0}, "head_dim=16.0"),
        ({"hidden_act": None}, "hidden_act=null"),
        ({"_name_or_path": 7}, None),  # not a key memplan relies on: no error
    ],
)  # fmt: skip
def test_bad_values_are_one_line_config_errors(tmp_path, fields, key):
    path = write(tmp_path, **fields)
    if key is None:
        assert read(path).name == tmp_path.name
        return
    with pytest.raises(ConfigError) as raised:
        read(path)
    message = str(raised.value)
    assert message.startswith("model.hf_config: ") and path in message and key in message, message
    assert "\n" not in message


def test_a_binary_file_is_a_one_line_config_error(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    with pytest.raises(ConfigError) as raised:
        read(str(path))
    expected = f"model.hf_config: {path} is not a config.json file (not UTF-8"
    assert str(raised.value).startswith(expected)


@pytest.mark.parametrize(
    "content", [b"\xff\xfe\x00binary", json.dumps({**BASE, "rope_scaling": [1]}).encode()]
)
def test_the_cli_prints_one_line_and_exits_2(tmp_path, content, capsys):
    path = tmp_path / "config.json"
    path.write_bytes(content)
    assert main(["plan", f"model.hf_config={path}", "cluster=cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("memplan plan: error: model.hf_config: "), err
    assert str(path) in err
