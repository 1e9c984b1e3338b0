"""The metadata beside a prepared token file (PATH.meta.json): data.dtype=auto reads it, and
`memplan train` refuses a file that disagrees with it or with the model (exit 2, one line
naming the key and the files)."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest

from configs.errors import ConfigError
from configs.schema import DataConfig
from configs.tokens import (
    TokenMetadata,
    check_training_tokens,
    metadata_path,
    read_token_metadata,
    token_dtype,
)
from framework.components.data import open_tokens
from launch.cli import main

TOKENIZER = b'{"version": "1.0", "model": {"type": "WordLevel"}}'
"""Stands for a tokenizer.json: these checks read only its bytes' sha256."""


def prepared(tmp_path, dtype: str = "uint32", count: int = 1000, vocab: int = 70_000, **fields):
    """A token file and the metadata `memplan data` would write for it."""
    path = tmp_path / "tokens.bin"
    (np.arange(count) % vocab).astype(dtype).tofile(path)
    metadata = TokenMetadata(
        dtype=dtype,
        vocab_size=vocab,
        tokenizer_sha256=hashlib.sha256(TOKENIZER).hexdigest(),
        eos_id=vocab - 1,
        num_tokens=count,
        num_documents=3,
        sources=("a.txt",),
    )
    metadata = dataclasses.replace(metadata, **fields)
    metadata_path(path).write_text(metadata.to_json())
    return path


def test_auto_dtype_is_the_metadata_s_and_uint16_without_metadata(tmp_path):
    path = prepared(tmp_path, "uint32")
    data = DataConfig(path=str(path))
    assert data.dtype == "auto" and token_dtype(data) == "uint32"
    tokens = open_tokens(data)
    assert tokens.dtype == np.uint32 and len(tokens) == 1000 and int(tokens[999]) == 999
    metadata_path(path).unlink()
    assert token_dtype(data) == "uint16"  # nanoGPT's files: no metadata
    assert len(open_tokens(data)) == 2000
    assert read_token_metadata(path) is None


def test_an_explicit_dtype_must_match_the_metadata(tmp_path):
    path = prepared(tmp_path, "uint32")
    check_training_tokens(DataConfig(path=str(path), dtype="uint32"), 32, 70_000)
    with pytest.raises(ConfigError) as info:
        check_training_tokens(DataConfig(path=str(path), dtype="uint16"), 32, 70_000)
    assert info.value.key == "data.dtype"
    assert f"{metadata_path(path)} records {path} as uint32" in str(info.value)


def test_the_token_count_must_match_the_file(tmp_path):
    path = prepared(tmp_path, "uint16", count=500, vocab=300)
    with path.open("ab") as handle:
        handle.write(b"\0\0")  # one token more than prepared
    with pytest.raises(ConfigError, match=r"holds 501 tokens but .*tokens\.bin\.meta\.json"):
        open_tokens(DataConfig(path=str(path)))


def test_a_vocabulary_larger_than_the_model_s_is_refused(tmp_path):
    path = prepared(tmp_path, "uint16", vocab=500)
    check_training_tokens(DataConfig(path=str(path)), 32, 500)
    check_training_tokens(DataConfig(path=str(path)), 32, 512)  # a padded embedding is fine
    with pytest.raises(ConfigError) as info:
        check_training_tokens(DataConfig(path=str(path)), 32, 256)
    message = str(info.value)
    assert info.value.key == "data.path"
    assert "vocabulary of 500 ids" in message and "model.vocab_size=256" in message
    assert str(metadata_path(path)) in message


def test_another_tokenizer_than_the_model_directory_s_is_refused(tmp_path):
    path = prepared(tmp_path, "uint16", vocab=500)
    model = tmp_path / "model"
    model.mkdir()
    data = DataConfig(path=str(path))
    check_training_tokens(data, 32, 512, str(model))  # no tokenizer.json: nothing to compare
    (model / "tokenizer.json").write_bytes(TOKENIZER)
    check_training_tokens(data, 32, 512, str(model))
    check_training_tokens(data, 32, 512, str(model / "config.json"))  # the file's directory
    (model / "tokenizer.json").write_bytes(TOKENIZER + b" ")
    with pytest.raises(ConfigError) as info:
        check_training_tokens(data, 32, 512, str(model))
    message = str(info.value)
    assert info.value.key == "data.path"
    assert str(metadata_path(path)) in message and str(model / "tokenizer.json") in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("not json", "is not valid JSON"),
        ('{"format": "other", "version": 1}', "format='other', expected 'memplan-tokens'"),
        ('{"format": "memplan-tokens", "version": 2}', "version 2 is newer than this memplan"),
        ('{"format": "memplan-tokens", "version": 1, "dtype": "uint16"}', "vocab_size=None"),
        ("BAD_DTYPE", "dtype='int8'; allowed: uint16, uint32"),
    ],
)
def test_unreadable_metadata_names_the_file(tmp_path, text, expected):
    path = prepared(tmp_path, "uint16", vocab=300)
    if text == "BAD_DTYPE":
        raw = json.loads(metadata_path(path).read_text())
        text = json.dumps({**raw, "dtype": "int8"})
    metadata_path(path).write_text(text)
    with pytest.raises(ConfigError) as info:
        check_training_tokens(DataConfig(path=str(path)), 32, 512)
    assert info.value.key == "data.path"
    assert str(metadata_path(path)) in str(info.value) and expected in str(info.value)


def test_memplan_train_refuses_a_file_for_a_larger_vocabulary_exit_2(tmp_path, capsys):
    path = prepared(tmp_path, "uint16", vocab=500)
    run_dir = tmp_path / "run"
    code = main(["train", f"data.path={path}", "train.seq_len=32", "train.global_batch_size=4",
                 "logging.wandb=false", f"launch.run_dir={run_dir}"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 2, captured.out + captured.err
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("memplan train: error: data.path: ")
    assert "model.vocab_size=256" in line and str(metadata_path(path)) in line
    assert not run_dir.exists()


def test_validation_tokens_get_the_metadata_checks_of_training_tokens(tmp_path):
    from launch.compose import compose_config
    from launch.train_command import check_validation_tokens

    path = prepared(tmp_path, "uint16", count=2000, vocab=200)  # ids < 200 fit either model
    cfg = compose_config([f"data.val_path={path}", "train.eval_every=1", "model.vocab_size=256"])
    check_validation_tokens(cfg)
    small = compose_config([f"data.val_path={path}", "train.eval_every=1", "model.vocab_size=100"])
    with pytest.raises(ConfigError) as info:  # tokenized for a larger vocabulary
        check_validation_tokens(small)
    assert info.value.key == "data.val_path" and "vocabulary of 200 ids" in str(info.value)
