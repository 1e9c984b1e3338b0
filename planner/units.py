"""Byte units and how memplan prints them (binary units: 1 GiB = 2**30 bytes)."""

from __future__ import annotations

KIB = 2**10
MIB = 2**20
GIB = 2**30


def format_gib(nbytes: float) -> str:
    """Always GiB, two decimals: 1.5 * 2**30 -> '1.50 GiB' (the plan tables' unit)."""
    return f"{nbytes / GIB:.2f} GiB"


def format_bytes(nbytes: float | None) -> str:
    """The largest binary unit that keeps the value >= 1: 1536 -> '1.50 KiB'; None -> '-'."""
    if nbytes is None:
        return "-"
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if abs(nbytes) >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{int(nbytes)} B"


def format_count(count: float) -> str:
    """A count with a decimal suffix, three significant digits: 770_048 -> '770K',
    1_235_814_400 -> '1.24B', 999_999 -> '1M', 999 -> '999'."""
    for suffix, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(count) >= 0.9995 * size:  # what rounds to 1000K reads as 1M
            return f"{count / size:.3g}{suffix}"
    return f"{count:.3g}"
