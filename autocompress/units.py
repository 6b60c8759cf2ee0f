"""Parsing and printing sizes: ``4GB`` = 4e9 bytes, ``4GiB`` = 4 * 2**30 bytes."""

from __future__ import annotations

import re

from .errors import AutocompressError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int | float) -> int:
    """'4GB' -> 4_000_000_000, '3.5GiB' -> 3758096384, '62000000' -> 62000000."""
    if isinstance(text, (int, float)):
        value, unit = float(text), ""
    else:
        match = _SIZE.match(str(text))
        if not match:
            raise AutocompressError(
                f"cannot read size {text!r}: write a number with an optional unit, "
                "e.g. 4GB, 3.5GiB, 80MB or 62000000"
            )
        value, unit = float(match.group(1)), match.group(2).lower()
    if unit not in _UNITS:
        raise AutocompressError(
            f"unknown size unit {unit!r} in {text!r}: use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB"
        )
    size = round(value * _UNITS[unit])
    if size <= 0:
        raise AutocompressError(f"size {text!r} must be positive")
    return size


def format_size(n_bytes: float) -> str:
    """Decimal units, three significant figures: 61.2 MB, 4.00 GB."""
    for unit, factor in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n_bytes) >= factor:
            return f"{n_bytes / factor:.3g} {unit}" if n_bytes / factor < 100 else \
                f"{n_bytes / factor:.0f} {unit}"
    return f"{int(n_bytes)} B"


_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(us|µs|ms|s)\s*$")
_DURATION_UNITS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0}


def parse_duration(text: str) -> float:
    """'30ms' -> 0.03 seconds; a unit is required (us, ms or s)."""
    match = _DURATION.match(str(text))
    if not match:
        raise AutocompressError(
            f"cannot read duration {text!r}: write a number with a unit, e.g. 30ms, 0.05s or 800us")
    seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds <= 0:
        raise AutocompressError(f"duration {text!r} must be positive")
    return seconds
