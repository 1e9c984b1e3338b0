"""Token files, the embedded corpus and deterministic, resumable batches."""

import numpy as np
import pytest
import torch

from configs.errors import ConfigError
from configs.schema import DataConfig
from configs.tokens import check_training_tokens
from framework.components.data import TokenLoader, open_tokens, stdlib_corpus


def test_embedded_corpus_is_stdlib_source_and_deterministic():
    first = stdlib_corpus(1 << 20)
    assert len(first) == 1 << 20
    assert first.dtype == np.uint8
    assert np.array_equal(first, stdlib_corpus(1 << 20))
    assert b"def " in first[:200_000].tobytes()


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_token_file_is_memory_mapped(tmp_path, dtype):
    values = np.arange(5000, dtype=dtype) % 1000
    path = tmp_path / "train.bin"
    values.tofile(path)
    tokens = open_tokens(DataConfig(path=str(path), dtype=dtype))
    assert isinstance(tokens, np.memmap)
    assert np.array_equal(tokens, values)


def test_missing_and_malformed_token_files(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.path: no such token file"):
        open_tokens(DataConfig(path=str(tmp_path / "absent.bin")))
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"abc")
    with pytest.raises(ConfigError, match="not a flat uint16 array"):
        open_tokens(DataConfig(path=str(odd), dtype="uint16"))
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"0 bytes, not a positive multiple of 4"):
        open_tokens(DataConfig(path=str(empty), dtype="uint32"))


def test_batches_are_a_function_of_seed_and_index():
    tokens = stdlib_corpus(1 << 18)
    loader = TokenLoader(tokens, 32, 8, seed=3, vocab_size=256)
    inputs, targets = loader.batch(5)
    again, _ = TokenLoader(tokens, 32, 8, seed=3, vocab_size=256).batch(5)
    other, _ = TokenLoader(tokens, 32, 8, seed=4, vocab_size=256).batch(5)
    assert inputs.shape == (8, 32) and inputs.dtype == torch.int64
    assert torch.equal(inputs, again) and not torch.equal(inputs, other)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])  # targets are inputs shifted by one


def test_state_round_trip_continues_exactly():
    tokens = stdlib_corpus(1 << 18)
    straight = TokenLoader(tokens, 16, 4, seed=0, vocab_size=256)
    expected = [straight.next_batch()[0] for _ in range(6)]
    first = TokenLoader(tokens, 16, 4, seed=0, vocab_size=256)
    for _ in range(3):
        first.next_batch()
    resumed = TokenLoader(tokens, 16, 4, seed=0, vocab_size=256)
    resumed.load_state_dict(first.state_dict())
    assert all(torch.equal(resumed.next_batch()[0], want) for want in expected[3:])
    with pytest.raises(ConfigError, match=r"train\.seed"):
        TokenLoader(tokens, 16, 4, seed=1, vocab_size=256).load_state_dict(first.state_dict())


def test_data_parallel_ranks_partition_the_global_batch():
    tokens = stdlib_corpus(1 << 18)
    whole = TokenLoader(tokens, 16, 8, seed=0, vocab_size=256).batch(2)[0]
    parts = [TokenLoader(tokens, 16, 8, 0, 256, rank, 4).batch(2)[0] for rank in range(4)]
    assert torch.equal(torch.cat(parts), whole)


def test_token_ids_beyond_the_vocabulary_are_rejected():
    tokens = np.full(1000, 300, dtype=np.uint16)
    with pytest.raises(ConfigError, match="vocab_size=256"):
        TokenLoader(tokens, 16, 2, seed=0, vocab_size=256).batch(0)


def test_the_launcher_checks_what_the_workers_would_trip_over(tmp_path):
    """configs/tokens.check_training_tokens: a file shorter than one sequence, a token id
    past the vocabulary, an embedded corpus too small or too wide for the model."""
    short = tmp_path / "short.bin"
    np.arange(33, dtype=np.uint16).tofile(short)
    with pytest.raises(ConfigError, match=r"^data.path: .*short.bin holds 33 tokens, shorter "
                       r"than one sequence: train.seq_len=32 needs >= 34$"):  # fmt: skip
        check_training_tokens(DataConfig(path=str(short)), 32, 256)
    check_training_tokens(DataConfig(path=str(short)), 31, 256)  # 33 = 31 + 2: enough

    wide = tmp_path / "wide.bin"
    np.array([1, 2, 70000, 3] * 100, dtype=np.uint32).tofile(wide)
    with pytest.raises(ConfigError, match=r"^data.path: .* holds token id 70000 >= model."
                       r"vocab_size=32000"):  # fmt: skip
        check_training_tokens(DataConfig(path=str(wide), dtype="uint32"), 16, 32000)
    check_training_tokens(DataConfig(path=str(wide), dtype="uint32"), 16, 70001)

    with pytest.raises(ConfigError, match=r"^data.embedded_max_bytes: 4096 bytes is shorter"):
        check_training_tokens(DataConfig(embedded_max_bytes=4096), 4095, 256)
    with pytest.raises(ConfigError, match=r"^model.vocab_size: 100, but the embedded corpus"):
        check_training_tokens(DataConfig(), 32, 100)
    with pytest.raises(ConfigError, match=r"^data.path: .* is a directory, not a token file$"):
        check_training_tokens(DataConfig(path=str(tmp_path)), 32, 256)
