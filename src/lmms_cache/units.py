"""Sizes and durations as people write them: ``"20GB"``, ``"512MiB"``, ``"30d"``, ``"12h"``."""

from __future__ import annotations

import datetime
import re

__all__ = ["format_size", "parse_duration", "parse_size"]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?)b?\s*$", re.I)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d|w)?\s*$", re.I)
_SECONDS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_size(value: str | int) -> int:
    """Bytes in ``value``: an int, or a number with a unit (``20GB`` = 20·10⁹, ``20GiB`` = 20·2³⁰).

    Example:
        >>> parse_size("20GB"), parse_size("1.5 KiB"), parse_size(4096)
        (20000000000, 1536, 4096)

    Raises:
        ValueError: not a size, or negative.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"a size cannot be negative: {value}")
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"not a size: {value!r} (write e.g. 20GB, 512MiB or a number of bytes)")
    number, prefix, binary = match.groups()
    power = "kmgtp".find(prefix.lower()) + 1 if prefix else 0
    return int(float(number) * ((1024 if binary else 1000) ** power))


def parse_duration(value: str | float | datetime.timedelta) -> float:
    """Seconds in ``value``: a number of seconds, a ``timedelta``, or ``30d``, ``12h``, ``90m``.

    Example:
        >>> parse_duration("30d"), parse_duration("90m"), parse_duration(5)
        (2592000.0, 5400.0, 5.0)

    Raises:
        ValueError: not a duration, or negative.
    """
    if isinstance(value, datetime.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"not a duration: {value!r} (write e.g. 30d, 12h, 90m or seconds)")
        seconds = float(match.group(1)) * _SECONDS[(match.group(2) or "s").lower()]
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative: {value!r}")
    return seconds


def format_size(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
