"""Agreement between judges: Cohen's kappa and percent agreement on the flagged / not-flagged decision."""

from __future__ import annotations

from itertools import combinations
from typing import Sequence


def percent_agreement(a: Sequence[bool], b: Sequence[bool]) -> float:
    """100 x the share of items on which both raters made the same decision."""
    _check(a, b)
    return 100.0 * sum(bool(x) == bool(y) for x, y in zip(a, b)) / len(a)


def cohen_kappa(a: Sequence[bool], b: Sequence[bool]) -> float | None:
    """Cohen's kappa for two binary raters: (p_o - p_e) / (1 - p_e), where p_o is the observed
    agreement and p_e = p_a p_b + (1 - p_a)(1 - p_b) the agreement expected by chance from each rater's
    own flag rate. None when undefined (p_e = 1: both raters gave every item the same one label)."""
    _check(a, b)
    n = len(a)
    p_o = sum(bool(x) == bool(y) for x, y in zip(a, b)) / n
    p_a, p_b = sum(map(bool, a)) / n, sum(map(bool, b)) / n
    p_e = p_a * p_b + (1 - p_a) * (1 - p_b)
    if p_e >= 1.0:
        return None
    return (p_o - p_e) / (1 - p_e)


def agreement_metrics(flags: dict[str, Sequence[bool]]) -> dict[str, float | None]:
    """``agreement/<a>~<b>/kappa`` and ``.../percent`` for every pair of judges, in the given order."""
    out: dict[str, float | None] = {}
    for a, b in combinations(list(flags), 2):
        kappa = cohen_kappa(flags[a], flags[b])
        out[f"agreement/{a}~{b}/kappa"] = None if kappa is None else round(kappa, 4)
        out[f"agreement/{a}~{b}/percent"] = round(percent_agreement(flags[a], flags[b]), 2)
    return out


def _check(a: Sequence[bool], b: Sequence[bool]) -> None:
    if len(a) != len(b):
        raise ValueError(f"raters judged different numbers of items ({len(a)} vs {len(b)})")
    if not a:
        raise ValueError("agreement needs at least one item")
