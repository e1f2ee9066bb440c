"""Percentiles and ratios: the few numbers every scenario reports."""

import math
from typing import Dict, Optional, Sequence


def percentile(values: Sequence[float], p: float) -> Optional[float]:
    """Linear interpolation between the closest ranks (numpy's default);
    None for no values."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary_ms(seconds: Sequence[float]) -> Dict[str, Optional[float]]:
    """p50/p99/p99.9 and count of durations given in seconds, in ms."""
    def ms(p: float) -> Optional[float]:
        v = percentile(seconds, p)
        return None if v is None else round(v * 1000.0, 3)
    return {"n": len(seconds), "p50_ms": ms(50), "p99_ms": ms(99), "p999_ms": ms(99.9)}


def ratio(a: Optional[float], b: Optional[float], digits: int = 3) -> Optional[float]:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, digits)
