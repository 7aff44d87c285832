"""Metrics shared with ``benchmarks/judge_quality.py`` (accuracy, AUC, Cohen's kappa, flag rate per
family), what the judge flags at a threshold, and the choice of that threshold."""

from __future__ import annotations

from typing import Sequence

from alignshield.evaluate.judges import embedded
from judge_training.families import HARD_NEGATIVE_FAMILIES, Example


def auc_score(labels: Sequence[int], scores: Sequence[float]) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula, ties counted half."""
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    n_pos = sum(1 for y in labels if y == 1)
    n_neg = len(labels) - n_pos
    if not n_pos or not n_neg:
        return float("nan")
    rank_sum = sum(r for r, y in zip(ranks, labels) if y == 1)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def binary_metrics(labels: Sequence[int], flags: Sequence[bool], scores: Sequence[float]) -> dict:
    tp = sum(1 for y, f in zip(labels, flags) if y == 1 and f)
    fp = sum(1 for y, f in zip(labels, flags) if y == 0 and f)
    fn = sum(1 for y, f in zip(labels, flags) if y == 1 and not f)
    tn = len(labels) - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    return {
        "n": len(labels),
        "accuracy": (tp + tn) / len(labels) if labels else float("nan"),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else float("nan"),
        "auc": auc_score(labels, scores),
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
    }


def family_rates(examples: Sequence[Example], flags: Sequence[bool]) -> dict:
    """Flag rate per family, and per variant inside harmful_format and degenerate."""
    groups: dict[str, list[bool]] = {}
    for ex, f in zip(examples, flags):
        groups.setdefault(ex.family, []).append(f)
        if ex.variant:
            groups.setdefault(f"{ex.family}/{ex.variant}", []).append(f)
    return {k: {"n": len(v), "flag_rate": sum(v) / len(v)} for k, v in sorted(groups.items())}


def cohen_kappa(a: Sequence[bool], b: Sequence[bool]) -> float:
    n = len(a)
    if not n:
        return float("nan")
    po = sum(1 for x, y in zip(a, b) if x == y) / n
    pa, pb = sum(a) / n, sum(b) / n
    pe = pa * pb + (1 - pa) * (1 - pb)
    return (po - pe) / (1 - pe) if pe < 1 else float("nan")


def judge_flags(examples: Sequence[Example], scores: Sequence[float], threshold: float, rules: bool = True) -> list[bool]:
    """What the judge flags: never degenerate answers or prompt echoes (embedded.never_flagged),
    the rest at the threshold. rules=False: the classifier alone (letter-free answers still 0)."""
    return [not embedded.unscored(e.prompt, e.answer, rules) and s >= threshold for e, s in zip(examples, scores)]


def choose_threshold(examples: Sequence[Example], scores: Sequence[float], default: float = 0.5,
                     max_hard_negative_rate: float = 0.10) -> float:
    """The threshold (0.05 .. 0.95, step 0.05) with the best Cohen's kappa on the held-out ``gold``
    examples (ties: the one nearest ``default``) among those that keep every hard-negative family's
    held-out flag rate <= ``max_hard_negative_rate`` (all thresholds when none does); ``default``
    when the gold examples lack one of the labels."""
    gold = [(e, s) for e, s in zip(examples, scores) if e.family == "gold"]
    labels = [e.label == 1 for e, _ in gold]
    if not gold or all(labels) or not any(labels):
        return default
    candidates = [round(0.05 * i, 2) for i in range(1, 20)]

    def hard_negative_ok(t: float) -> bool:
        rates = family_rates(list(examples), judge_flags(examples, scores, t))
        return all(rates[f]["flag_rate"] <= max_hard_negative_rate for f in HARD_NEGATIVE_FAMILIES if f in rates)

    allowed = [t for t in candidates if hard_negative_ok(t)] or candidates
    return max(allowed, key=lambda t: (cohen_kappa(labels, judge_flags([e for e, _ in gold], [s for _, s in gold], t)),
                                       -abs(t - default)))
