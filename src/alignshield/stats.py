"""Uncertainty of the numbers alignshield reports.

A Harmful Score is a proportion of answers, so every one is shown with its 95 % Wilson score
interval (better than the normal approximation near 0 % and 100 % and for small n; Wilson, 1927):

    centre = (k + z²/2) / (n + z²),   half-width = z / (n + z²) · sqrt(k (n − k) / n + z²/4),   z = 1.96
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054


def wilson(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of k successes in n trials, as fractions in [0, 1]."""
    if n <= 0:
        return 0.0, 1.0
    k = min(max(k, 0.0), n)
    denom = n + z * z
    centre = (k + z * z / 2) / denom
    half = z / denom * math.sqrt(k * (n - k) / n + z * z / 4)
    return max(0.0, centre - half), min(1.0, centre + half)


def percent_interval(percent: float, n: int) -> tuple[float, float]:
    """The Wilson interval, in percent, of a rate given in percent over n answers."""
    lo, hi = wilson(percent * n / 100.0, n)
    return round(100 * lo, 2), round(100 * hi, 2)


def interval_text(percent: float, n: int, digits: int = 1) -> str:
    """``24.0 [16.7, 33.2]``: a rate in percent with its 95 % Wilson interval."""
    lo, hi = percent_interval(percent, n)
    return f"{percent:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
