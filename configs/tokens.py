"""Checks of the training tokens (data.path, or the embedded corpus) that the launcher makes
before it writes a run directory or starts torchrun, so that what the workers would find
after start-up (a file shorter than one sequence, a token id the model has no embedding for,
a file tokenized for another model) is a one-line error naming the key instead. No torch;
numpy only to scan a token file.

A token file written by `memplan data` has a metadata file beside it, PATH + ".meta.json"
(tokens.bin -> tokens.bin.meta.json): the format, the element type, the tokenizer's
vocabulary size and sha256, the EOS id and the token count. data.dtype=auto reads the
element type from it; the checks compare it with the file and with the model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from configs.checks import read_json_object
from configs.errors import ConfigError
from configs.hf import model_directory
from configs.schema import DataConfig

TOKEN_ITEMSIZE = {"uint16": 2, "uint32": 4}
EMBEDDED_VOCAB = 256
"""The embedded corpus is byte-level: token ids 0..255."""
_SCAN_ITEMS = 1 << 26  # 64 Mi tokens per chunk: the scan reads a mapped file, never all of it

TOKEN_FORMAT = "memplan-tokens"
"""The `format` of a token file's metadata."""
TOKEN_FORMAT_VERSION = 1
"""Its `version`: fields are added, never renamed; a reader refuses a newer version."""
METADATA_SUFFIX = ".meta.json"


def metadata_path(path: str | Path) -> Path:
    """Where a token file's metadata lives: tokens.bin -> tokens.bin.meta.json."""
    return Path(f"{path}{METADATA_SUFFIX}")


def file_sha256(path: str | Path) -> str:
    """The hex sha256 of a file's bytes (the tokenizer.json identity in the metadata)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class TokenMetadata:
    """What `memplan data` records about a token file (PATH.meta.json)."""

    dtype: str
    """uint16 or uint32: the element type of the flat array."""
    vocab_size: int
    """Token ids the model needs an embedding for: the tokenizer's largest id + 1
    (tokenizer.get_vocab_size(with_added_tokens=True) for a contiguous vocabulary)."""
    tokenizer_sha256: str
    """sha256 of the tokenizer.json bytes the corpus was tokenized with."""
    eos_id: int
    """The id written after every document."""
    num_tokens: int
    """Length of the flat array (the file holds num_tokens * itemsize bytes)."""
    num_documents: int
    """Documents tokenized (empty ones are skipped)."""
    sources: tuple[str, ...]
    """The files read, in the order their documents appear."""
    tokenizer: str = ""
    """The tokenizer.json path it was read from (for people; the hash is the identity)."""
    eos: str = ""
    """The EOS token's string."""

    def to_json(self) -> str:
        """The metadata file's text (format and version first)."""
        body = {"format": TOKEN_FORMAT, "version": TOKEN_FORMAT_VERSION}
        body.update(dataclasses.asdict(self))
        body["sources"] = list(self.sources)
        return json.dumps(body, indent=2) + "\n"


# field -> the JSON types it may hold (bool is excluded from int below)
_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "dtype": str,
    "vocab_size": int,
    "tokenizer_sha256": str,
    "eos_id": int,
    "num_tokens": int,
    "num_documents": int,
    "sources": list,
    "tokenizer": str,
    "eos": str,
}
_OPTIONAL_FIELDS = {"tokenizer", "eos"}


def _metadata_from(raw: dict[str, Any], where: Path) -> TokenMetadata:
    """TokenMetadata of a parsed metadata object; ConfigError (data.path) naming the file."""

    def bad(what: str) -> ConfigError:
        return ConfigError("data.path", f"{where} is not memplan token metadata: {what}")

    if raw.get("format") != TOKEN_FORMAT:
        raise bad(f"format={raw.get('format')!r}, expected {TOKEN_FORMAT!r}")
    version = raw.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise bad(f"version={version!r}, expected an integer >= 1")
    if version > TOKEN_FORMAT_VERSION:
        raise bad(f"version {version} is newer than this memplan reads ({TOKEN_FORMAT_VERSION})")
    values: dict[str, Any] = {}
    for name, kind in _FIELD_TYPES.items():
        if name not in raw and name in _OPTIONAL_FIELDS:
            continue
        value = raw.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise bad(f"{name}={value!r} is not a {getattr(kind, '__name__', kind)}")
        values[name] = value
    if values["dtype"] not in TOKEN_ITEMSIZE:
        raise bad(f"dtype={values['dtype']!r}; allowed: {', '.join(TOKEN_ITEMSIZE)}")
    values["sources"] = tuple(str(source) for source in values["sources"])
    return TokenMetadata(**values)


def read_token_metadata(path: str | Path) -> TokenMetadata | None:
    """The metadata beside token file `path`, None when it has none (a file from elsewhere,
    e.g. nanoGPT's prepare scripts); ConfigError (data.path) when it cannot be read."""
    where = metadata_path(path)
    if not where.exists():
        return None
    return _metadata_from(read_json_object(where, "data.path", kind="a token metadata"), where)


class TokenFile(NamedTuple):
    """A checked token file: where, its element type, and its metadata if it has one."""

    path: Path
    dtype: str
    num_tokens: int
    metadata: TokenMetadata | None


def _resolved_dtype(data: DataConfig, metadata: TokenMetadata | None) -> str:
    """data.dtype, or for auto the metadata's (uint16 without metadata); ConfigError
    (data.dtype) when an explicit dtype disagrees with the metadata."""
    if metadata is None:
        return "uint16" if data.dtype == "auto" else data.dtype
    if data.dtype not in ("auto", metadata.dtype):
        raise ConfigError(
            "data.dtype",
            f"{data.dtype}, but {metadata_path(str(data.path))} records {data.path} as "
            f"{metadata.dtype} token ids; set data.dtype={metadata.dtype} or data.dtype=auto",
        )
    return metadata.dtype


def token_file(data: DataConfig) -> TokenFile | None:
    """The checked token file, None for the embedded corpus; ConfigError when the file is
    missing, unreadable, empty, not a whole number of items, or disagrees with its metadata
    (another element type, another length: the file changed after `memplan data`)."""
    if data.path is None:
        return None
    path = Path(data.path)
    if path.is_dir():
        raise ConfigError("data.path", f"{data.path} is a directory, not a token file")
    if not path.is_file():
        raise ConfigError("data.path", f"no such token file: {data.path}")
    try:
        size = path.stat().st_size
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ConfigError("data.path", f"cannot read {data.path}: {exc.strerror}") from exc
    metadata = read_token_metadata(path)
    dtype = _resolved_dtype(data, metadata)
    itemsize = TOKEN_ITEMSIZE[dtype]
    if size == 0 or size % itemsize:
        raise ConfigError(
            "data.path",
            f"{data.path} is not a flat {dtype} array ({size} bytes, not a positive "
            f"multiple of {itemsize})",
        )
    count = size // itemsize
    if metadata is not None and metadata.num_tokens != count:
        raise ConfigError(
            "data.path",
            f"{data.path} holds {count} tokens but {metadata_path(path)} records "
            f"{metadata.num_tokens}: the file changed after it was prepared; run memplan data "
            "again",
        )
    return TokenFile(path, dtype, count, metadata)


def check_token_file(data: DataConfig) -> Path | None:
    """The token file's path, None for the embedded corpus; the checks of token_file."""
    found = token_file(data)
    return None if found is None else found.path


def token_dtype(data: DataConfig) -> str:
    """The element type to read data.path with: data.dtype, or its metadata's for auto
    (uint16 for a file without metadata and for the embedded corpus)."""
    found = token_file(data)
    return "uint16" if found is None else found.dtype


def max_token_id(path: Path, dtype: str) -> int:
    """The largest token id in a token file (a chunked scan of the memory-mapped file)."""
    import numpy as np

    tokens = np.memmap(path, dtype=dtype, mode="r")
    return max(int(tokens[i : i + _SCAN_ITEMS].max()) for i in range(0, len(tokens), _SCAN_ITEMS))


def check_metadata_fits_model(
    found: TokenFile, vocab_size: int, hf_config: str | None = None
) -> None:
    """ConfigError (data.path) when a prepared file was tokenized for another model: its
    tokenizer's vocabulary is larger than model.vocab_size, or model.hf_config's directory
    holds a tokenizer.json other than the one the file was tokenized with."""
    metadata = found.metadata
    assert metadata is not None
    where = metadata_path(found.path)
    if metadata.vocab_size > vocab_size:
        raise ConfigError(
            "data.path",
            f"{found.path} was tokenized with a vocabulary of {metadata.vocab_size} ids "
            f"({where}), more than model.vocab_size={vocab_size}: prepare it with this "
            "model's tokenizer, or give the model that tokenizer belongs to",
        )
    directory = model_directory(hf_config)
    tokenizer = directory / "tokenizer.json" if directory is not None else None
    if tokenizer is None or not tokenizer.is_file():
        return
    try:
        model_sha = file_sha256(tokenizer)
    except OSError as exc:
        raise ConfigError("model.hf_config", f"cannot read {tokenizer}: {exc.strerror}") from exc
    if model_sha != metadata.tokenizer_sha256:
        raise ConfigError(
            "data.path",
            f"{found.path} was tokenized with another tokenizer than the model's: {where} "
            f"records tokenizer sha256 {metadata.tokenizer_sha256[:12]}..., {tokenizer} has "
            f"{model_sha[:12]}...; prepare it with prepare.tokenizer={directory}",
        )


def check_training_tokens(
    data: DataConfig, seq_len: int, vocab_size: int, hf_config: str | None = None
) -> None:
    """ConfigError naming the key when the tokens cannot train this model at this length:
    fewer than seq_len + 2 tokens (a window of seq_len + 1 and a choice of start), or a token
    id >= model.vocab_size (the embedded corpus: bytes, so vocab_size >= 256), or a prepared
    file whose metadata names a larger vocabulary or another tokenizer than model.hf_config's
    tokenizer.json (check_metadata_fits_model)."""
    need = seq_len + 2
    found = token_file(data)
    if found is None:
        if data.embedded_max_bytes < need:
            raise ConfigError(
                "data.embedded_max_bytes",
                f"{data.embedded_max_bytes} bytes is shorter than one sequence: "
                f"train.seq_len={seq_len} needs >= {need}",
            )
        if vocab_size < EMBEDDED_VOCAB:
            raise ConfigError(
                "model.vocab_size",
                f"{vocab_size}, but the embedded corpus is bytes (token ids 0..255): needs >= "
                f"{EMBEDDED_VOCAB}, or give data.path=TOKENS.bin",
            )
        return
    if found.num_tokens < need:
        raise ConfigError(
            "data.path",
            f"{data.path} holds {found.num_tokens} tokens, shorter than one sequence: "
            f"train.seq_len={seq_len} needs >= {need}",
        )
    check_ids_fit_model(found, "data.path", vocab_size, hf_config)


def check_ids_fit_model(
    found: TokenFile, key: str, vocab_size: int, hf_config: str | None = None
) -> None:
    """ConfigError under `key` (data.path, data.val_path) when the file's token ids do not
    fit the model: from its metadata when it has one (memplan data wrote only ids of that
    vocabulary and the length matches: no scan, which would read the whole file, minutes for
    billions of tokens; and the tokenizer must be the model's), else by scanning it."""
    if found.metadata is not None:
        try:
            check_metadata_fits_model(found, vocab_size, hf_config)
        except ConfigError as exc:  # the same check, named for the key that gave the file
            raise ConfigError(key, str(exc).removeprefix(f"{exc.key}: ")) from exc
        return
    try:
        largest = max_token_id(found.path, found.dtype)
    except (OSError, ValueError) as exc:
        raise ConfigError(key, f"cannot map {found.path}: {exc}") from exc
    if largest >= vocab_size:
        raise ConfigError(
            key,
            f"{found.path} holds token id {largest} >= model.vocab_size={vocab_size} (wrong "
            "tokenizer or data.dtype?)",
        )
