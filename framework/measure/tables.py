"""Plain-text tables and labels the benchmarks print (bench/*.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from configs.schema import ModelConfig


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain text table: the first column left-aligned, the others right-aligned; a row
    shorter than the headers leaves its last cells empty."""
    cells = [[str(c) for c in row] + [""] * (len(headers) - len(row)) for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.ljust(w) if i == 0 else v.rjust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        ]
        return " | ".join(parts).rstrip()

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in cells)])


def seq_label(tokens: int) -> str:
    """65536 -> '64K'; 384 -> '384'."""
    return f"{tokens // 1024}K" if tokens >= 1024 and tokens % 1024 == 0 else str(tokens)


def percent(error: float | None) -> str:
    """A signed relative error: 0.0123 -> '+1.23%'; None -> '-'."""
    return "-" if error is None else f"{100 * error:+.2f}%"


def model_line(model: ModelConfig) -> str:
    """'model tiny: 4 layers, hidden 128, heads 4/2, ffn 352, vocab 256'."""
    return (
        f"model {model.name}: {model.num_layers} layers, hidden {model.hidden_size}, heads "
        f"{model.num_heads}/{model.num_kv_heads}, ffn {model.ffn_size}, vocab {model.vocab_size}"
    )
