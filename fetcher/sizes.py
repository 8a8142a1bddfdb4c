"""Byte counts as people write them and as fetcher prints them.

Settings take ``16GiB`` as readily as ``17179869184``: decimal units (``KB``,
``MB``, ``GB``, ``TB``: powers of 1000) and binary ones (``KiB`` … ``TiB``:
powers of 1024), in any case, with or without a space. Everything fetcher
prints (the summary, the progress bars) uses binary units only, so a figure in
one place can be compared with a figure in another.
"""

from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE = re.compile(r"(\d+(?:\.\d+)?) ?([a-z]*)")


def parse_size(text: str) -> int:
    """``"16GiB"`` -> 17179869184; raises ``ValueError`` for anything not a size.

    A fraction is allowed with a unit (``1.5GiB``) as long as the result is whole
    bytes' worth once rounded down; a bare number must be an integer.
    """
    match = _SIZE.fullmatch(text.strip().lower())
    if match is None or match.group(2) not in _UNITS:
        raise ValueError(f"not a size: {text!r}")
    number, unit = match.groups()
    if "." in number and not unit:
        raise ValueError(f"not a whole number of bytes: {text!r}")
    # Decimal arithmetic on the digits, not a float: 16 TiB stays exact.
    whole, _, fraction = number.partition(".")
    scale = _UNITS[unit]
    return int(whole) * scale + (int(fraction) * scale // 10 ** len(fraction) if fraction else 0)


def format_size(count: float) -> str:
    """``1536`` -> ``"1.5 KiB"``: bytes in binary units, one decimal above bytes."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover
