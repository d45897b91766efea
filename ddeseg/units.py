"""Byte sizes as users write them (`24GiB`, `40GB`) and as tables print them."""

from __future__ import annotations

import re

from ddeseg.errors import DDESegError

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_bytes(text: str | int) -> int:
    """`"24GiB"`, `"40GB"`, `"80 gib"`, `"512MiB"`, `1024` -> bytes (GiB = 2^30, GB = 10^9).

    Raises `DDESegError` naming the text for anything else."""
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        if not match or match.group(2).lower() not in _UNITS:
            raise DDESegError(f"memory size {text!r} is not a size such as 24GiB, 40GB or 512MiB")
        value, unit = float(match.group(1)), match.group(2).lower()
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise DDESegError(f"memory size {text!r} must be positive")
    return size


def format_bytes(size: float) -> str:
    """Bytes -> `"1.41 GiB"` (binary units)."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(size) >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size:.0f} B"
