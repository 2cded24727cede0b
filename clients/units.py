"""Human units on the command line: durations (``90s``, ``10m``, ``1h30m``) and sizes
(``512M``, ``10G``, ``10GB``).

Sizes: ``K``, ``M``, ``G``, ``T`` (and ``KiB``... ``TiB``) are powers of 1024;
``KB``, ``MB``, ``GB``, ``TB`` are powers of 1000; a bare number is bytes. Durations:
``s``, ``m``, ``h`` (and ``d``), several in a row add up; a bare number is seconds.
A value that does not parse is a ValueError naming it, never a guess.
"""

from __future__ import annotations

import re

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGTkmgt]?)(iB|B)?$")
_POWERS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}


def parse_duration(text: str) -> int:
    """Whole seconds in ``text`` (``10m`` -> 600, ``1h30m`` -> 5400, ``45`` -> 45)."""
    value = text.strip().lower()
    if re.fullmatch(r"\d+", value):
        return int(value)
    parts = _DURATION.findall(value)
    if not value or "".join(n + u for n, u in parts) != value:
        raise ValueError(f"not a duration: {text!r} (say 90s, 10m, 1h30m)")
    seconds = sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)
    if seconds != int(seconds):
        raise ValueError(f"not a whole number of seconds: {text!r}")
    return int(seconds)


def parse_size(text: str) -> int:
    """Bytes in ``text`` (``10G`` -> 10 GiB, ``10GB`` -> 10**10, ``4096`` -> 4096)."""
    found = _SIZE.match(text.strip())
    if found is None:
        raise ValueError(f"not a size: {text!r} (say 512M, 10G, 10GB)")
    number, prefix, suffix = found.groups()
    power = _POWERS[prefix.upper()]
    if suffix == "iB" and not power:
        raise ValueError(f"not a size: {text!r} (say 512M, 10G, 10GB)")
    base = 1000 if suffix == "B" else 1024
    size = float(number) * base**power
    if size != int(size):
        raise ValueError(f"not a whole number of bytes: {text!r}")
    return int(size)


def format_duration(seconds: float) -> str:
    """A short reading of a duration: ``42s``, ``12m05s``, ``3h20m``."""
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def human_size(size: int) -> str:
    """Bytes in binary units, three digits: ``1.5G``, ``512M``, ``100B``."""
    for unit, scale in (("T", 2**40), ("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if size >= scale:
            return f"{size / scale:.3g}{unit}"
    return f"{size}B"
