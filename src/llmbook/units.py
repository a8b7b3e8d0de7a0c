"""Human-readable numbers for tables and prose: 124.4M parameters, 13.5 GB, 3.2 days.

Decimal prefixes throughout (1 GB = 10**9 bytes), as GPU datasheets use; the
book says GiB explicitly where it means 2**30.
"""

from __future__ import annotations

import math

_PREFIXES = [(1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")]
_BYTE_PREFIXES = [(1e15, "PB"), (1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "KB")]


def _trim(value: float, digits: int) -> str:
    """3 significant digits, without a trailing '.0': 124.4 -> '124', 13.46 -> '13.5'."""
    if value == 0:
        return "0"
    value = float(f"{value:.{digits - 1}e}")  # round first, so 9.996 -> 10.0, not '10.00'
    decimals = max(0, digits - 1 - int(math.floor(math.log10(abs(value)))))
    return f"{value:.{decimals}f}"


def count(n: float, digits: int = 3) -> str:
    """Large counts with a suffix: 124_439_808 -> '124M', 6.7e9 -> '6.70B', 2e12 -> '2.00T'."""
    n = float(f"{n:.{digits - 1}e}")  # 999_999 rounds to 1.00M, not '1000K'
    for scale, suffix in _PREFIXES:
        if abs(n) >= scale:
            return _trim(n / scale, digits) + suffix
    return _trim(n, digits)


def nbytes(n: float, digits: int = 3) -> str:
    """Bytes with a decimal unit: 1.35e10 -> '13.5 GB'."""
    n = float(f"{n:.{digits - 1}e}")
    for scale, suffix in _BYTE_PREFIXES:
        if abs(n) >= scale:
            return f"{_trim(n / scale, digits)} {suffix}"
    return f"{_trim(n, digits)} B"


def flops(n: float, digits: int = 3) -> str:
    """A FLOP count in scientific notation, as papers write it: 1.1e21 -> '1.10e21'."""
    mantissa, exponent = f"{n:.{digits - 1}e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def duration(seconds: float) -> str:
    """The largest sensible unit: 90 -> '1.50 min', 3.1e5 -> '3.59 days', 4e7 -> '1.27 years'."""
    for scale, unit in [(365.25 * 86400, "years"), (86400, "days"), (3600, "h"), (60, "min")]:
        if float(f"{seconds / scale:.2e}") >= 1:
            return f"{_trim(seconds / scale, 3)} {unit}"
    return f"{_trim(seconds, 3)} s"
