"""How numbers are shown in tables, notes and log lines: one formatter per kind, used everywhere.

percent(0.0512)               "5.1%"       percent(0.05, 0)   "5%"
percent(0.0512, spaced=True)  "5.1 %"      share_percent(0.05)  "5%" (shortest exact)
number(None)                  "–"          number(0.12345)    "0.123"
finite_or_none(float("nan"))  None
"""

from __future__ import annotations

import math

MISSING = "–"


def _absent(x: float | None) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def percent(
    x: float | None, digits: int = 1, *, spaced: bool = False, missing: str = MISSING
) -> str:
    """A fraction as a percentage with `digits` decimals; `missing` for None or NaN."""
    if _absent(x):
        return missing
    assert x is not None
    return f"{100 * x:.{digits}f} %" if spaced else f"{x:.{digits}%}"


def share_percent(x: float) -> str:
    """A traffic share as the shortest exact percentage: 0.05 → "5%", 0.125 → "12.5%"."""
    return f"{x * 100:g}%"


def number(x: float | None, fmt: str = ".3f", *, missing: str = MISSING) -> str:
    """A number in `fmt`; `missing` for None or NaN; anything else that is not a float as is."""
    if _absent(x):
        return missing
    if isinstance(x, float):
        return format(x, fmt)
    return str(x)


def finite_or_none(x: float | None) -> float | None:
    """A finite float, or None for None, NaN and ±inf (what metrics and gates can use)."""
    return None if x is None or not math.isfinite(x) else float(x)


def not_nan(x: float | None) -> float | None:
    """A float, or None for None and NaN (±inf kept: the report shows it)."""
    return None if _absent(x) else float(x)  # type: ignore[arg-type]
