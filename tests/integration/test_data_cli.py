"""`memplan data` as a user runs it: a corpus tokenized with a tokenizer trained here (no
download) equals the tokenizers library's encodings with EOS after each document, the file
trains with `memplan train data.path=...`, and a model it does not fit is exit 2, one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from configs.tokens import metadata_path
from tests.cli import memplan
from tests.integration.test_train_cli import TINY, losses
from tests.unit.test_data_prepare import expected_tokens, stdlib_documents, train_bpe_tokenizer

pytestmark = pytest.mark.integration


def _one_line(done) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    return line


def test_prepare_then_train_on_the_file(tmp_path):
    documents = stdlib_documents(tmp_path / "corpus")
    tokenizer = train_bpe_tokenizer(documents, tmp_path / "tok" / "tokenizer.json")
    lines = ["import sys\nprint(sys.argv)\n", "x = {'a': 1}\n"]
    with (tmp_path / "corpus" / "z.jsonl").open("w") as handle:
        handle.writelines(json.dumps({"text": text}) + "\n" for text in lines)
    out = tmp_path / "data" / "tokens.bin"

    done = memplan(
        "data",
        f"prepare.source={tmp_path / 'corpus' / '*'}",
        f"prepare.tokenizer={tokenizer.parent}",
        f"prepare.out={out}",
        "prepare.workers=2",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"wrote {out}: " in done.stdout and f"wrote {metadata_path(out)}" in done.stdout
    texts = [path.read_text() for path in documents] + lines  # sorted: *.txt, then z.jsonl
    assert np.fromfile(out, dtype=np.uint16).tolist() == expected_tokens(tokenizer, texts)

    train = ["train", *TINY, "train.steps=2", f"data.path={out}"]
    trained = memplan(*train, "model.vocab_size=512", f"launch.run_dir={tmp_path / 'run'}")
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    assert sorted(losses(trained.stdout)) == [1, 2]

    refused = memplan(*train, f"launch.run_dir={tmp_path / 'refused'}")  # tiny: vocab 256
    line = _one_line(refused)
    assert line.startswith("memplan train: error: data.path: ")
    assert "vocabulary of 500 ids" in line and str(metadata_path(out)) in line
    assert not (tmp_path / "refused").exists()


def test_bad_input_is_exit_2_and_one_line(tmp_path):
    done = memplan(
        "data",
        f"prepare.source={tmp_path}/*.jsonl",
        f"prepare.tokenizer={tmp_path}",
        f"prepare.out={tmp_path / 'tokens.bin'}",
    )
    expected = f"memplan data: error: prepare.source: no file matches {tmp_path}/*.jsonl"
    assert _one_line(done) == expected
    assert list(tmp_path.iterdir()) == []
