"""`memplan data prepare.source=PATH_OR_GLOB prepare.tokenizer=PATH prepare.out=FILE`: a corpus
of text, JSON-lines or Parquet files tokenized with a model's tokenizer.json into a token
file (a flat uint16/uint32 array, nanoGPT's .bin) and FILE.meta.json, which `memplan train
data.path=FILE` checks against the model (configs/tokens.py). prepare.tokenizer defaults to
the model.hf_config directory's tokenizer.json. No torch (framework/components/
corpus_prepare.py). Exit code 2 (launch/cli.py): bad input, one line naming the key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from configs.errors import ConfigError
from configs.hf import model_directory
from configs.tokens import metadata_path
from framework.components.corpus_prepare import prepare_corpus
from launch.compose import compose_config
from launch.run_dir import check_writable_file


def run(args: Sequence[str]) -> int:
    """Entry point of `memplan data` (launch/cli.py maps ConfigError to exit 2)."""
    cfg = compose_config(list(args))
    prepare = cfg.prepare
    if not prepare.source:
        raise ConfigError(
            "prepare.source",
            "required: the corpus, a file, a directory or a glob, e.g. "
            "prepare.source='data/*.jsonl'",
        )
    tokenizer = prepare.tokenizer or model_directory(cfg.model.hf_config)
    if tokenizer is None:
        raise ConfigError(
            "prepare.tokenizer",
            "required: a tokenizer.json or a model directory holding one, e.g. "
            "prepare.tokenizer=models/Llama-3.2-1B (or model.hf_config=DIR)",
        )
    if not prepare.out:
        raise ConfigError("prepare.out", "required: the token file to write, e.g. tokens.bin")
    out = check_writable_file(prepare.out, "prepare.out")
    check_writable_file(metadata_path(out), "prepare.out")
    prepare = dataclasses.replace(prepare, tokenizer=str(tokenizer), out=str(out))
    metadata = prepare_corpus(prepare)
    files = len(metadata.sources)
    print(
        f"wrote {out}: {metadata.num_tokens:,} tokens ({metadata.dtype}) from "
        f"{metadata.num_documents:,} documents in {files} file{'s' if files != 1 else ''}; "
        f"vocabulary {metadata.vocab_size:,}, EOS {metadata.eos!r} = {metadata.eos_id}"
    )
    print(f"wrote {metadata_path(out)}")
    print(f"train on it: memplan train data.path={out} (model.vocab_size >= {metadata.vocab_size})")
    return 0
