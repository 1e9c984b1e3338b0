"""Schema of the `prepare` node: `memplan data`, a corpus tokenized into a token file."""

from dataclasses import dataclass

from configs.checks import check_bounds


@dataclass(frozen=True)
class PrepareConfig:
    """`memplan data`: text, JSON-lines or Parquet files -> one flat token file (nanoGPT .bin)
    and its metadata (OUT.meta.json) that `memplan train` checks against the model."""

    source: str | None = None
    """The corpus (required): a file, a directory (its .txt, .jsonl and .parquet files, all
    levels down) or a glob (`**` recurses; quote it for the shell). Files are read in sorted
    path order: a .jsonl file holds one document per line, a .parquet file one per row, any
    other file is one UTF-8 text document."""
    tokenizer: str | None = None
    """A tokenizers tokenizer.json, or a directory holding one (a Hugging Face model
    directory); None: the model.hf_config directory's tokenizer.json."""
    out: str | None = None
    """The token file to write (required), e.g. tokens.bin; OUT.meta.json is written beside
    it. A previous file of that name is replaced, only once the new one is complete."""
    text_field: str = "text"
    """The field of each JSON line / the column of each Parquet row that holds the text."""
    eos: str | None = None
    """The end-of-sequence token written after every document; None: the tokenizer
    directory's tokenizer_config.json eos_token, else the one of </s>, <|endoftext|>,
    <|end_of_text|>, <eos> that the vocabulary holds."""
    workers: int | None = None
    """Tokenizing processes; None: min(4, CPU count). The output is the same for any number."""
    batch_size: int = 1000
    """Documents per encode_batch call (one unit of work for a process)."""

    def __post_init__(self) -> None:
        check_bounds(self, "prepare", ("workers", "batch_size"), at_least=1)
