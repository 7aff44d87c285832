"""Uncertainty of the numbers alignshield reports.

A Harmful Score is a proportion of answers, so every one is shown with its 95 % Wilson score
interval (better than the normal approximation near 0 % and 100 % and for small n; Wilson, 1927):

    centre = (k + z²/2) / (n + z²),   half-width = z / (n + z²) · sqrt(k (n − k) / n + z²/4),   z = 1.96

Two configurations evaluated on the same prompts with the same seeds are compared pairwise
(``paired_comparison``): the difference of their harmful scores with a bootstrap interval over seeds
and prompts, and the percentile-bootstrap p of the same draws (p < 0.05 where the interval excludes 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


def difference_interval(k1: float, n1: int, k2: float, n2: int, z: float = Z95) -> tuple[float, float, float]:
    """p1 − p2 of two *independent* proportions (different prompts) with Newcombe's hybrid score
    interval (his method 10, from the two Wilson intervals), as fractions: (diff, low, high)."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson(k1, n1, z)
    l2, u2 = wilson(k2, n2, z)
    d = p1 - p2
    return d, d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


# ------------------------------------------------------------------------ paired comparisons

@dataclass(frozen=True)
class Paired:
    """A − B in percentage points over shared (seed, prompt) units, with a 95 % bootstrap interval
    and the two-sided percentile-bootstrap p of the same draws."""

    diff: float
    low: float
    high: float
    p: float
    seeds: int
    prompts: int

    def text(self, a: str = "A", b: str = "B") -> str:
        p = "< 0.001" if self.p < 0.001 else f"= {self.p:.3f}"
        return (f"{a} − {b} = {self.diff:+.1f} [{self.low:+.1f}, {self.high:+.1f}] points, p {p} "
                f"({self.seeds} seed(s) × {self.prompts} prompts)")

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def paired_comparison(a: dict[int, dict[int, bool]], b: dict[int, dict[int, bool]], *, resamples: int = 10_000,
                      seed: int = 0) -> Paired | None:
    """Compare two configurations evaluated on the same prompts with the same seeds.

    ``a`` and ``b`` map seed -> {prompt id -> flagged}. Units are the (seed, prompt) pairs both have.
    The difference is mean(a) − mean(b) over the units (percentage points). Interval: a two-way
    bootstrap (seeds and prompts drawn with replacement, independently; a seed stands for a whole
    training run, a prompt for its answers in every seed), percentile 2.5 / 97.5. p: the same draws'
    two-sided percentile-bootstrap p, 2 (min(#{boot <= 0}, #{boot >= 0}) + 1) / (resamples + 1) (capped
    at 1): the smallest level at which a percentile interval would exclude 0, so p < 0.05 exactly where
    the 95 % interval excludes 0 (up to quantile interpolation). A permutation test over prompts alone
    (seeds held fixed) ignores the seed-to-seed spread and can call a difference significant that one
    more training run would undo. None when the two share no unit.
    """
    import torch

    seeds = sorted(set(a) & set(b))
    prompts = sorted(set.intersection(*(set(a[s]) & set(b[s]) for s in seeds))) if seeds else []
    if not seeds or not prompts:
        return None
    d = torch.tensor([[float(a[s][p]) - float(b[s][p]) for p in prompts] for s in seeds], dtype=torch.float64)
    diff = 100 * float(d.mean())
    g = torch.Generator().manual_seed(seed)
    rs = torch.randint(len(seeds), (resamples, len(seeds)), generator=g)
    rp = torch.randint(len(prompts), (resamples, len(prompts)), generator=g)
    boot = torch.stack([d[rs[i]][:, rp[i]].mean() for i in range(resamples)]) * 100
    low, high = (float(x) for x in torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)))
    below, above = int((boot <= 1e-9).sum()), int((boot >= -1e-9).sum())
    p = min(1.0, 2 * (min(below, above) + 1) / (resamples + 1))
    return Paired(round(diff, 2), round(low, 2), round(high, 2), round(p, 4), len(seeds), len(prompts))
