"""A corpus tokenized into a token file (`memplan data`): text, JSON-lines and Parquet files ->
one flat array of token ids (nanoGPT's .bin, what data.py's open_tokens maps) and its
metadata (configs/tokens.py: TokenMetadata, PATH.meta.json). No torch.

- Documents: the source files in sorted path order; a .txt (any non-JSON-lines, non-Parquet)
  file is one document, a .jsonl file one per line (field prepare.text_field), a .parquet
  file one per row (that column). Empty documents are skipped.
- Each document is `tokenizer.encode(text).ids` (the tokenizer's own post-processing, such as
  a Llama BOS, included) followed by the EOS id, unless that post-processing already appends
  EOS. The file is that concatenation, as uint16 when every id fits (vocabularies of up to
  65,536 ids), else uint32.
- Batches of prepare.batch_size documents go to prepare.workers processes; results are
  written in submission order, so the file is the same for any number of workers.
- The file is written under a temporary name and renamed when complete: a failed run never
  leaves a partial file under prepare.out.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tokenizers import Tokenizer

from configs.checks import read_json_object
from configs.errors import ConfigError
from configs.schema import PrepareConfig
from configs.tokens import TokenMetadata, file_sha256, metadata_path

log = logging.getLogger(__name__)

CORPUS_SUFFIXES = (".jsonl", ".parquet", ".txt")
"""What a directory given as prepare.source contributes (a glob or a file may name others)."""
NOT_TEXT_SUFFIXES = frozenset(
    {".json", ".gz", ".zst", ".bz2", ".xz", ".zip", ".tar", ".bin", ".npy", ".arrow", ".pt"}
    | {".safetensors"}
)
"""Files that are not UTF-8 text documents (compressed, binary, JSON that is not one object a
line): refused by name rather than tokenized as text."""
EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")
"""End-of-sequence spellings looked for when no tokenizer_config.json names one."""
UINT16_IDS = 1 << 16
"""uint16 holds ids 0..65535: a vocabulary of up to 65,536 ids."""


# ---------------------------------------------------------------------------- the files


def _has_magic(pattern: str) -> bool:
    return any(char in pattern for char in "*?[")


def source_files(source: str) -> list[Path]:
    """The files prepare.source names, in the order their documents are read (sorted path
    order); ConfigError (prepare.source) when none, or one is not a corpus file."""
    path = Path(source).expanduser()
    if path.is_file():
        found = [path]
    elif path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.suffix in CORPUS_SUFFIXES and p.is_file())
        if not found:
            raise ConfigError(
                "prepare.source",
                f"{source} is a directory without {', '.join(CORPUS_SUFFIXES)} files",
            )
    elif _has_magic(source):
        matches = glob.glob(os.path.expanduser(source), recursive=True)
        found = sorted(Path(p) for p in matches if Path(p).is_file())
        if not found:
            raise ConfigError("prepare.source", f"no file matches {source}")
    else:
        raise ConfigError("prepare.source", f"no such file or directory: {source}")
    for file in found:
        if file.suffix.lower() in NOT_TEXT_SUFFIXES:
            raise ConfigError(
                "prepare.source",
                f"{file} is not a corpus file; allowed: .jsonl (one JSON object a line), "
                ".parquet, or UTF-8 text",
            )
    return found


# ---------------------------------------------------------------------------- the tokenizer


@dataclasses.dataclass(frozen=True)
class TokenizerFile:
    """A loaded tokenizer.json and what the token file needs of it."""

    path: Path
    """The tokenizer.json."""
    text: str
    """Its JSON: what worker processes rebuild the tokenizer from."""
    sha256: str
    """sha256 of its bytes (the identity `memplan train` compares)."""
    vocab_size: int
    """Ids the model needs an embedding for: the largest id + 1."""
    eos: str
    """The end-of-sequence token."""
    eos_id: int
    """Its id."""
    appends_eos: bool
    """Whether the tokenizer's post-processing already ends every encoding with EOS."""

    @property
    def dtype(self) -> str:
        """uint16 when every id fits, else uint32."""
        return "uint16" if self.vocab_size <= UINT16_IDS else "uint32"


def tokenizer_json_path(tokenizer: str) -> Path:
    """prepare.tokenizer's tokenizer.json: the file itself or DIR/tokenizer.json."""
    path = Path(tokenizer).expanduser()
    if path.is_dir():
        candidate = path / "tokenizer.json"
        if candidate.is_file():
            return candidate
        hint = (
            " (only a sentencepiece tokenizer.model: write tokenizer.json with transformers'"
            " AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR))"
            if (path / "tokenizer.model").is_file()
            else ""
        )
        raise ConfigError(
            "prepare.tokenizer", f"{path} is a directory without a tokenizer.json{hint}"
        )
    if not path.is_file():
        raise ConfigError("prepare.tokenizer", f"no such file or directory: {tokenizer}")
    return path


def _configured_eos(path: Path) -> str | None:
    """The eos_token of the tokenizer_config.json beside tokenizer.json, if one names it."""
    config = path.parent / "tokenizer_config.json"
    if not config.is_file():
        return None
    value = read_json_object(config, "prepare.tokenizer", kind="a tokenizer_config.json").get(
        "eos_token"
    )
    if isinstance(value, dict):  # older files: an AddedToken object {"content": "</s>", ...}
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def find_eos(tokenizer: Tokenizer, path: Path, eos: str | None) -> tuple[str, int]:
    """(token, id) of the end-of-sequence token: prepare.eos, else tokenizer_config.json's
    eos_token, else the one of EOS_NAMES in the vocabulary; ConfigError (prepare.eos) when
    none is determinable or the named one is not in the vocabulary."""
    if eos is not None:
        found = tokenizer.token_to_id(eos)
        if found is None:
            raise ConfigError("prepare.eos", f"{eos!r} is not a token of {path}")
        return eos, found
    configured = _configured_eos(path)
    if configured is not None:
        found = tokenizer.token_to_id(configured)
        if found is None:
            raise ConfigError(
                "prepare.eos",
                f"{path.parent / 'tokenizer_config.json'} names eos_token {configured!r}, which"
                f" {path} does not hold; set prepare.eos=TOKEN",
            )
        return configured, found
    present = [name for name in EOS_NAMES if tokenizer.token_to_id(name) is not None]
    if len(present) > 1:
        raise ConfigError(
            "prepare.eos",
            f"{path} holds several end-of-sequence candidates ({', '.join(present)}); set "
            "prepare.eos to one (quoted: prepare.eos=\"'</s>'\")",
        )
    if not present:
        raise ConfigError(
            "prepare.eos",
            f"cannot tell the end-of-sequence token of {path}: no tokenizer_config.json "
            f"eos_token beside it and none of {', '.join(EOS_NAMES)} in its vocabulary; set "
            "prepare.eos=\"'TOKEN'\"",
        )
    return present[0], tokenizer.token_to_id(present[0])


def load_tokenizer(tokenizer: str, eos: str | None = None) -> TokenizerFile:
    """The tokenizer.json that prepare.tokenizer names, checked; ConfigError
    (prepare.tokenizer) when it cannot be read or is not a tokenizers tokenizer."""
    path = tokenizer_json_path(tokenizer)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError("prepare.tokenizer", f"cannot read {path}: {exc.strerror}") from exc
    try:
        text = raw.decode("utf-8")
        loaded = Tokenizer.from_str(text)
    except UnicodeDecodeError as exc:
        raise ConfigError(
            "prepare.tokenizer",
            f"{path} is not a tokenizer.json (not UTF-8 text: byte {exc.start})",
        ) from exc
    except Exception as exc:  # tokenizers raises a bare Exception for any parse failure
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            "prepare.tokenizer", f"{path} is not a tokenizers tokenizer.json ({detail})"
        ) from exc
    eos_token, eos_id = find_eos(loaded, path, eos)
    largest = max(loaded.get_vocab(with_added_tokens=True).values(), default=-1)
    vocab_size = max(loaded.get_vocab_size(with_added_tokens=True), largest + 1)
    # a post-processor such as T5's appends EOS itself: probe with and without it
    with_special = loaded.encode("a").ids
    plain = loaded.encode("a", add_special_tokens=False).ids
    appends = with_special[-1:] == [eos_id] and plain[-1:] != [eos_id]
    return TokenizerFile(
        path, text, file_sha256(path), vocab_size, eos_token, eos_id, appends_eos=appends
    )


def encode_documents(
    tokenizer: Tokenizer, texts: list[str], eos_id: int, appends_eos: bool, dtype: str
) -> np.ndarray:
    """The documents' ids, each followed by eos_id (unless the tokenizer appends it)."""
    ids: list[int] = []
    for encoding in tokenizer.encode_batch_fast(texts):  # the ids of encode(), no offsets
        ids.extend(encoding.ids)
        if not appends_eos:
            ids.append(eos_id)
    return np.asarray(ids, dtype=dtype)


# One tokenizer per worker process, built once by _start_worker.
_WORKER: dict[str, Any] = {}


def _start_worker(text: str, eos_id: int, appends_eos: bool, dtype: str) -> None:
    # the processes are the parallelism: tokenizers' own thread pool in each would
    # oversubscribe the cores
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER.update(
        tokenizer=Tokenizer.from_str(text), eos_id=eos_id, appends_eos=appends_eos, dtype=dtype
    )


def _encode_in_worker(texts: list[str]) -> np.ndarray:
    return encode_documents(
        _WORKER["tokenizer"], texts, _WORKER["eos_id"], _WORKER["appends_eos"], _WORKER["dtype"]
    )


# ---------------------------------------------------------------------------- the documents


class Batch(NamedTuple):
    """Up to prepare.batch_size documents and the source bytes they cover (for progress)."""

    texts: list[str]
    source_bytes: float


def _text_documents(path: Path) -> Iterator[tuple[str, float]]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError("prepare.source", f"cannot read {path}: {exc.strerror}") from exc
    try:
        yield raw.decode("utf-8"), len(raw)
    except UnicodeDecodeError as exc:
        raise ConfigError(
            "prepare.source",
            f"{path} is not UTF-8 text (byte {exc.start}); allowed: .jsonl, .parquet or UTF-8 "
            "text files",
        ) from exc


def _jsonl_documents(path: Path, field: str) -> Iterator[tuple[str, float]]:
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise ConfigError("prepare.source", f"cannot read {path}: {exc.strerror}") from exc
    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():  # a blank line (often the last) holds no document
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
                raise ConfigError(
                    "prepare.source", f"{path}:{number}: not a JSON line ({exc})"
                ) from exc
            if not isinstance(record, dict) or field not in record:
                fields = ", ".join(record) if isinstance(record, dict) else "not an object"
                raise ConfigError(
                    "prepare.text_field",
                    f"{path}:{number} has no {field!r} field ({fields}); set "
                    "prepare.text_field to the field that holds the text",
                )
            text = record[field]
            if not isinstance(text, str):
                raise ConfigError(
                    "prepare.text_field",
                    f"{path}:{number}: {field!r} holds {type(text).__name__}, not text",
                )
            yield text, len(line)


def _parquet_documents(path: Path, field: str, batch_size: int) -> Iterator[tuple[str, float]]:
    import pyarrow as pa  # only a corpus with Parquet files pays for importing pyarrow
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise ConfigError("prepare.source", f"{path} is not a Parquet file ({exc})") from exc
    schema = parquet.schema_arrow
    if field not in schema.names:
        raise ConfigError(
            "prepare.text_field",
            f"{path} has no column {field!r} (columns: {', '.join(schema.names)}); set "
            "prepare.text_field to the column that holds the text",
        )
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ConfigError("prepare.text_field", f"{path}: column {field!r} is {kind}, not text")
    rows = max(parquet.metadata.num_rows, 1)
    per_row = path.stat().st_size / rows  # progress: the file's bytes spread over its rows
    row = 0
    try:
        for record_batch in parquet.iter_batches(batch_size=batch_size, columns=[field]):
            for text in record_batch.column(0).to_pylist():
                if text is None:
                    raise ConfigError("prepare.source", f"{path}: row {row}: {field!r} is null")
                row += 1
                yield text, per_row
    except pa.ArrowException as exc:
        raise ConfigError("prepare.source", f"cannot read {path} ({exc})") from exc


def read_documents(files: list[Path], text_field: str, batch_size: int) -> Iterator[Batch]:
    """The files' non-empty documents in order, batch_size at a time."""
    texts: list[str] = []
    covered = 0.0
    for path in files:
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            documents = _jsonl_documents(path, text_field)
        elif suffix == ".parquet":
            documents = _parquet_documents(path, text_field, batch_size)
        else:
            documents = _text_documents(path)
        for text, size in documents:
            covered += size
            if text:
                texts.append(text)
            if len(texts) == batch_size:
                yield Batch(texts, covered)
                texts, covered = [], 0.0
    if texts or covered:
        yield Batch(texts, covered)


# ---------------------------------------------------------------------------- the run


def default_workers() -> int:
    """min(4, CPU count): past a few processes, reading the files is the bottleneck."""
    return min(4, os.cpu_count() or 1)


class Encoded(NamedTuple):
    """One batch's token ids, how many documents they hold and the source bytes covered."""

    ids: np.ndarray
    documents: int
    source_bytes: float


def _encoded(cfg: PrepareConfig, tok: TokenizerFile, files: list[Path]) -> Iterator[Encoded]:
    """The batches encoded by cfg.workers processes, in document order."""
    batches = read_documents(files, cfg.text_field, cfg.batch_size)
    workers = cfg.workers or default_workers()
    if workers == 1:
        tokenizer = Tokenizer.from_str(tok.text)
        for batch in batches:
            ids = encode_documents(tokenizer, batch.texts, tok.eos_id, tok.appends_eos, tok.dtype)
            yield Encoded(ids, len(batch.texts), batch.source_bytes)
        return
    # spawn: no fork of a process whose tokenizer may already run threads
    context = multiprocessing.get_context("spawn")
    args = (tok.text, tok.eos_id, tok.appends_eos, tok.dtype)
    with context.Pool(workers, initializer=_start_worker, initargs=args) as pool:
        pending: deque[tuple[Any, Batch]] = deque()
        for batch in batches:
            pending.append((pool.apply_async(_encode_in_worker, (batch.texts,)), batch))
            # a bounded window keeps memory flat (Pool.imap would read the whole corpus ahead)
            if len(pending) >= 2 * workers:
                result, done = pending.popleft()
                yield Encoded(result.get(), len(done.texts), done.source_bytes)
        while pending:
            result, done = pending.popleft()
            yield Encoded(result.get(), len(done.texts), done.source_bytes)


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def prepare_corpus(cfg: PrepareConfig, progress: bool = True) -> TokenMetadata:
    """Tokenize cfg.source with cfg.tokenizer into cfg.out and write cfg.out + .meta.json.

    Both files appear (replacing earlier ones) only once complete. A progress bar over the
    source bytes goes to stderr when it is a terminal and `progress` is set.
    """
    from tqdm import tqdm

    if not cfg.source or not cfg.tokenizer or not cfg.out:
        missing = next(k for k in ("source", "tokenizer", "out") if not getattr(cfg, k))
        raise ConfigError(f"prepare.{missing}", "required")
    files = source_files(cfg.source)
    tok = load_tokenizer(cfg.tokenizer, cfg.eos)
    out = Path(cfg.out).absolute()
    meta_out = metadata_path(out)
    created = [d for d in (out.parent, *out.parent.parents) if not d.exists()]  # deepest first
    out.parent.mkdir(parents=True, exist_ok=True)
    finished = False
    tmp_bin, tmp_meta = _temporary(out), _temporary(meta_out)
    total = float(sum(path.stat().st_size for path in files))
    num_tokens = num_documents = 0
    try:
        with (
            open(tmp_bin, "wb") as handle,
            tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                desc="tokenizing",
                file=sys.stderr,
                disable=None if progress else True,  # None: off unless stderr is a terminal
            ) as bar,
        ):
            for encoded in _encoded(cfg, tok, files):
                encoded.ids.tofile(handle)
                num_tokens += len(encoded.ids)
                num_documents += encoded.documents
                bar.update(encoded.source_bytes)
        if num_tokens == 0:
            raise ConfigError(
                "prepare.source", f"{cfg.source}: {len(files)} file(s) with no text to tokenize"
            )
        metadata = TokenMetadata(
            dtype=tok.dtype,
            vocab_size=tok.vocab_size,
            tokenizer_sha256=tok.sha256,
            eos_id=tok.eos_id,
            num_tokens=num_tokens,
            num_documents=num_documents,
            sources=tuple(str(path.absolute()) for path in files),
            tokenizer=str(tok.path.absolute()),
            eos=tok.eos,
        )
        tmp_meta.write_text(metadata.to_json())
        # the token file first: a crash between the renames leaves a new file beside old
        # metadata, whose token count `memplan train` refuses
        os.replace(tmp_bin, out)
        os.replace(tmp_meta, meta_out)
        finished = True
    except OSError as exc:
        raise ConfigError(
            "prepare.out", f"cannot write {exc.filename or out}: {exc.strerror}"
        ) from exc
    finally:
        for leftover in (tmp_bin, tmp_meta):
            leftover.unlink(missing_ok=True)
        for directory in created if not finished else []:  # a failed run leaves nothing
            try:
                directory.rmdir()
            except OSError:
                break
    log.info("wrote %s (%d tokens) and %s", out, num_tokens, meta_out)
    return metadata
