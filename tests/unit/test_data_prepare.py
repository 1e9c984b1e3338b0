"""`memplan data`: a corpus tokenized into a token file. The oracle is the tokenizers library:
the file is tokenizer.encode(document).ids of each document in sorted file order, each
followed by EOS, whatever the number of processes; bad input is exit 2 and one line."""

from __future__ import annotations

import hashlib
import json
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from configs.errors import ConfigError
from configs.schema import PrepareConfig
from configs.tokens import metadata_path, read_token_metadata
from framework.components.corpus_prepare import prepare_corpus
from launch.cli import main

STDLIB_FILES = ("abc.py", "bisect.py", "colorsys.py", "copy.py", "fnmatch.py")
"""A few files of the embedded corpus (Python's standard library sources)."""
EOS = "<|endoftext|>"


def stdlib_documents(directory: Path) -> list[Path]:
    """STDLIB_FILES copied into `directory` as .txt documents, in sorted order."""
    directory.mkdir(parents=True, exist_ok=True)
    root = Path(sysconfig.get_paths()["stdlib"])
    copies = []
    for name in STDLIB_FILES:
        copy = directory / f"{Path(name).stem}.txt"
        shutil.copyfile(root / name, copy)
        copies.append(copy)
    return sorted(copies)


def train_bpe_tokenizer(texts: list[Path], path: Path, vocab_size: int = 500) -> Path:
    """A byte-level BPE tokenizer trained here on `texts` (no download), saved to `path`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(text) for text in texts], trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path


def word_level_tokenizer(path: Path, words: int, specials: tuple[str, ...] = ("</s>",)) -> Path:
    """A WordLevel tokenizer of w0 .. w{words-1} plus `specials` (cheap at any size)."""
    vocab = {f"w{i}": i for i in range(words)}
    vocab.update({name: words + i for i, name in enumerate(("[UNK]", *specials))})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path


def expected_tokens(tokenizer: Path, documents: list[str], eos: str = EOS) -> list[int]:
    """The oracle: each document's tokenizer.encode ids, then the EOS id."""
    loaded = Tokenizer.from_file(str(tokenizer))
    eos_id = loaded.token_to_id(eos)
    ids: list[int] = []
    for document in documents:
        ids += [*loaded.encode(document).ids, eos_id]
    return ids


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[list[Path], Path]:
    """(the .txt documents, a BPE tokenizer.json trained on them)."""
    root = tmp_path_factory.mktemp("corpus")
    documents = stdlib_documents(root / "docs")
    return documents, train_bpe_tokenizer(documents, root / "tok" / "tokenizer.json")


def prepare(tmp_path: Path, source: str, tokenizer: Path, **fields) -> tuple[np.ndarray, Path]:
    out = tmp_path / "out" / "tokens.bin"
    fields = {"workers": 1, **fields}
    metadata = prepare_corpus(
        PrepareConfig(source=source, tokenizer=str(tokenizer), out=str(out), **fields),
        progress=False,
    )
    tokens = np.fromfile(out, dtype=metadata.dtype)
    assert len(tokens) == metadata.num_tokens
    return tokens, out


def test_text_files_are_their_encodings_each_followed_by_eos(tmp_path, corpus):
    documents, tokenizer = corpus
    tokens, out = prepare(tmp_path, str(documents[0].parent), tokenizer)
    texts = [path.read_text() for path in documents]
    assert tokens.tolist() == expected_tokens(tokenizer, texts)
    assert tokens.dtype == np.uint16
    metadata = read_token_metadata(out)
    assert metadata is not None
    assert metadata_path(out) == out.with_name("tokens.bin.meta.json")
    assert metadata.vocab_size == Tokenizer.from_file(str(tokenizer)).get_vocab_size(True) == 500
    assert metadata.tokenizer_sha256 == hashlib.sha256(tokenizer.read_bytes()).hexdigest()
    assert (metadata.eos, metadata.num_documents) == (EOS, len(documents))
    assert list(metadata.sources) == [str(path) for path in documents]
    raw = json.loads(metadata_path(out).read_text())
    assert (raw["format"], raw["version"], raw["dtype"]) == ("memplan-tokens", 1, "uint16")


def test_the_file_is_the_same_for_any_number_of_workers(tmp_path, corpus):
    documents, tokenizer = corpus
    source = str(documents[0].parent / "*.txt")
    one, _ = prepare(tmp_path / "one", source, tokenizer, workers=1)
    # one document per batch: the two processes finish out of order, the file must not
    two, _ = prepare(tmp_path / "two", source, tokenizer, workers=2, batch_size=1)
    assert np.array_equal(one, two)
    assert len(one) > 1000


def test_jsonl_and_parquet_documents_in_sorted_file_order(tmp_path, corpus):
    _, tokenizer = corpus
    data = tmp_path / "data"
    data.mkdir()
    lines = ["def f(x):\n    return x\n", "import os", "", "class A:\n    pass\n"]
    with (data / "b.jsonl").open("w") as handle:
        for text in lines:
            handle.write(json.dumps({"id": 1, "body": text}) + "\n")
        handle.write("\n")  # a trailing blank line holds no document
    rows = ["for i in range(3):\n    print(i)\n", "x = [1, 2, 3]"]
    pq.write_table(pa.table({"body": rows, "n": [1, 2]}), data / "a.parquet")
    (data / "c.txt").write_text("while True:\n    break\n")
    tokens, out = prepare(tmp_path, str(data / "*"), tokenizer, text_field="body", batch_size=2)
    # sorted: a.parquet, b.jsonl, c.txt; the empty JSON line is skipped
    documents = [*rows, *[text for text in lines if text], "while True:\n    break\n"]
    assert tokens.tolist() == expected_tokens(tokenizer, documents)
    metadata = read_token_metadata(out)
    assert metadata is not None and metadata.num_documents == len(documents) == 6


def test_a_vocabulary_over_65536_ids_is_uint32(tmp_path):
    big = word_level_tokenizer(tmp_path / "big.json", 70_000)
    (tmp_path / "doc.txt").write_text("w69999 w3 w65536 w0")
    tokens, out = prepare(tmp_path, str(tmp_path / "doc.txt"), big)
    assert tokens.dtype == np.uint32
    assert tokens.tolist() == [69_999, 3, 65_536, 0, 70_001]  # ... then </s> (after [UNK])
    metadata = read_token_metadata(out)
    assert metadata is not None and (metadata.dtype, metadata.vocab_size) == ("uint32", 70_002)
    # 65,536 ids (0..65535) still fit uint16
    fits = word_level_tokenizer(tmp_path / "fits.json", 65_534)
    (tmp_path / "doc.txt").write_text("w65533 w1")
    tokens, _ = prepare(tmp_path / "fits", str(tmp_path / "doc.txt"), fits)
    assert tokens.dtype == np.uint16 and tokens.tolist() == [65_533, 1, 65_535]


def test_eos_from_tokenizer_config_or_prepare_eos(tmp_path):
    model = tmp_path / "model"
    word_level_tokenizer(model / "tokenizer.json", 10, specials=("</s>", EOS))
    (tmp_path / "doc.txt").write_text("w1 w2")
    with pytest.raises(ConfigError, match=r"prepare\.eos: .* several end-of-sequence candidates"):
        prepare(tmp_path, str(tmp_path / "doc.txt"), model)
    # the older AddedToken spelling of eos_token
    config = {"eos_token": {"content": EOS, "special": True}}
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    tokens, _ = prepare(tmp_path, str(tmp_path / "doc.txt"), model)  # a directory works too
    assert tokens.tolist() == [1, 2, 12]
    tokens, _ = prepare(tmp_path, str(tmp_path / "doc.txt"), model, eos="</s>")
    assert tokens.tolist() == [1, 2, 11]


def test_a_post_processor_s_bos_and_eos_are_kept_and_eos_not_doubled(tmp_path):
    path = word_level_tokenizer(tmp_path / "t.json", 10, specials=("<s>", "</s>"))
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 11), ("</s>", 12)]
    )
    tokenizer.save(str(path))
    (tmp_path / "a.txt").write_text("w1 w2")
    (tmp_path / "b.txt").write_text("w3")
    tokens, _ = prepare(tmp_path, str(tmp_path / "*.txt"), path)
    assert tokens.tolist() == [11, 1, 2, 12, 11, 3, 12]  # encode(doc).ids, no second </s>


def test_a_failed_run_keeps_the_previous_file_and_leaves_nothing_behind(tmp_path, corpus):
    documents, tokenizer = corpus
    before, out = prepare(tmp_path, str(documents[0]), tokenizer)
    meta_before = metadata_path(out).read_text()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x = 1"}\n' * 5 + '{"content": "y"}\n')
    with pytest.raises(ConfigError, match=r"bad\.jsonl:6 has no 'text' field"):
        prepare(tmp_path, str(bad), tokenizer, batch_size=2)
    assert np.array_equal(np.fromfile(out, dtype=np.uint16), before)
    assert metadata_path(out).read_text() == meta_before
    assert sorted(p.name for p in out.parent.iterdir()) == ["tokens.bin", "tokens.bin.meta.json"]


def _one_line_error(capsys, args: list[str]) -> str:
    code = main(["data", *args])
    captured = capsys.readouterr()
    assert code == 2, captured.out + captured.err
    assert "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("no-match", "prepare.source: no file matches {d}/nothing-*.txt"),
        ("no-field", "prepare.text_field: {d}/bad.jsonl:2 has no 'text' field (content)"),
        ("not-json", "prepare.source: {d}/broken.jsonl:1: not a JSON line"),
        ("json-file", "prepare.source: {d}/doc.json is not a corpus file; allowed: .jsonl"),
        ("no-column", "prepare.text_field: {d}/rows.parquet has no column 'text' (columns: c)"),
        ("not-tokenizer", "prepare.tokenizer: {d}/notok.json is not a tokenizers tokenizer.json"),
        ("text-tokenizer", "prepare.tokenizer: {d}/doc.txt is not a tokenizers tokenizer.json"),
        ("no-tokenizer", "prepare.tokenizer: {d} is a directory without a tokenizer.json"),
        ("unwritable", "prepare.out: cannot create {d}/doc.txt/tokens.bin: {d}/doc.txt is a file"),
        ("no-eos", "prepare.eos: cannot tell the end-of-sequence token of {d}/plain.json"),
        ("eos-unknown", "prepare.eos: '<eot>' is not a token of"),
        ("no-source", "prepare.source: required"),
        ("no-out", "prepare.out: required"),
        ("workers", "prepare.workers: must be >= 1 or null, got 0"),
    ],
)
def test_bad_input_is_exit_2_and_one_line(tmp_path, capsys, corpus, case, expected):
    _, tokenizer = corpus
    d = tmp_path
    (d / "doc.txt").write_text("x = 1\n")
    (d / "doc.json").write_text('{"text": "x"}')
    (d / "bad.jsonl").write_text('{"text": "a"}\n{"content": "b"}\n')
    (d / "broken.jsonl").write_text("{not json\n")
    pq.write_table(pa.table({"c": ["x"]}), d / "rows.parquet")
    (d / "notok.json").write_text('{"version": "1.0", "vocab": [1, 2]}')
    word_level_tokenizer(d / "plain.json", 10, specials=())
    out, good = f"prepare.out={d / 'out' / 'tokens.bin'}", f"prepare.tokenizer={tokenizer}"
    source = f"prepare.source={d / 'doc.txt'}"
    args = {
        "no-match": [f"prepare.source={d}/nothing-*.txt", good, out],
        "no-field": [f"prepare.source={d / 'bad.jsonl'}", good, out],
        "not-json": [f"prepare.source={d / 'broken.jsonl'}", good, out],
        "json-file": [f"prepare.source={d / 'doc.json'}", good, out],
        "no-column": [f"prepare.source={d / 'rows.parquet'}", good, out],
        "not-tokenizer": [source, f"prepare.tokenizer={d / 'notok.json'}", out],
        "text-tokenizer": [source, f"prepare.tokenizer={d / 'doc.txt'}", out],
        "no-tokenizer": [source, f"prepare.tokenizer={d}", out],
        "unwritable": [source, good, f"prepare.out={d / 'doc.txt' / 'tokens.bin'}"],
        "no-eos": [source, f"prepare.tokenizer={d / 'plain.json'}", out],
        "eos-unknown": [source, good, out, "prepare.eos='<eot>'"],
        "no-source": [good, out],
        "no-out": [source, good],
        "workers": [source, good, out, "prepare.workers=0"],
    }[case]
    line = _one_line_error(capsys, args)
    assert line.startswith("memplan data: error: ")
    assert expected.format(d=d) in line
    assert not (d / "out").exists()  # refused before writing anything


def test_the_tokenizer_defaults_to_the_model_directory_s(tmp_path, capsys, corpus):
    documents, tokenizer = corpus
    model = tmp_path / "model"
    model.mkdir()
    shutil.copyfile(tokenizer, model / "tokenizer.json")
    llama = {
        "model_type": "llama",
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    (model / "config.json").write_text(json.dumps(llama))
    out = tmp_path / "tokens.bin"
    code = main(["data", f"model.hf_config={model}", f"prepare.source={documents[0]}",
                 f"prepare.out={out}", "prepare.workers=1"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"wrote {out}: " in captured.out
    texts = [documents[0].read_text()]
    assert np.fromfile(out, dtype=np.uint16).tolist() == expected_tokens(tokenizer, texts)
