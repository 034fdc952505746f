"""A sample of numbers, as the statistics modules take it, and its one validation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Values = Sequence[float] | np.ndarray


def as_sample(values: Values, what: str, min_size: int = 0) -> np.ndarray:
    """`values` as a flat float array; `ValueError` naming `what` when it is not flat, too
    short, or holds NaN or infinite values."""
    x = np.asarray(values, dtype=float)
    if x.ndim != 1:
        raise ValueError(f"{what} must be a flat sequence of numbers, got shape {x.shape}")
    if x.size < min_size:
        raise ValueError(f"{what} needs at least {min_size} values, got {x.size}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what} must be finite (no NaN or infinite values)")
    return x
