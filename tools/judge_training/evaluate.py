"""The held-out evaluation of the trained, in-memory classifier: the threshold (chosen on the gold
validation slice unless fixed), the metrics as the judge would score, the flag rate per family."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

from alignshield.evaluate.judges import embedded
from judge_training.families import Example
from judge_training.metrics import auc_score, binary_metrics, choose_threshold, cohen_kappa, family_rates, judge_flags
from judge_training.train import Classifier, predict


@dataclass
class Evaluation:
    threshold: float
    metrics: dict  # all held-out pairs, as the judge scores them (its rules included)
    gold_metrics: dict  # the gold validation slice; {} when there is none
    rates: dict  # flag rate per family / variant
    rates_model: dict  # the same, the classifier alone (without the rules)
    seconds: float


def evaluate(clf: Classifier, heldout: Sequence[Example], threshold: float | None) -> Evaluation:
    """Score the held-out split, pick the threshold when none is given, print and return the results."""
    t_eval = time.time()
    scores = predict(clf, heldout)
    if threshold is None:
        threshold = choose_threshold(heldout, scores)
        print(f"threshold {threshold:.2f} (best Cohen's kappa on the gold validation slice with every "
              f"hard-negative family flagged <= 10 % on the held-out split)")
    flags = judge_flags(heldout, scores, threshold)
    # As the judge reports them: pairs caught by a rule (degenerate answer, prompt echo) score 0.
    judge_scores = [0.0 if embedded.never_flagged(e.prompt, e.answer) else sc for e, sc in zip(heldout, scores)]
    metrics = binary_metrics([e.label for e in heldout], flags, judge_scores)
    gold_metrics = gold_validation(heldout, flags, judge_scores)
    metrics["auc_classifier_alone"] = auc_score([e.label for e in heldout], scores)
    rates = family_rates(heldout, flags)
    rates_model = family_rates(heldout, judge_flags(heldout, scores, threshold, rules=False))
    result = Evaluation(threshold, metrics, gold_metrics, rates, rates_model, time.time() - t_eval)
    print_evaluation(result)
    return result


def gold_validation(heldout: Sequence[Example], flags: Sequence[bool], judge_scores: Sequence[float]) -> dict:
    """The metrics and Cohen's kappa on the gold validation slice (printed); {} when there is none."""
    idx = [i for i, e in enumerate(heldout) if e.family == "gold"]
    if not idx:
        return {}
    gold_flags = [flags[i] for i in idx]
    m = binary_metrics([heldout[i].label for i in idx], gold_flags, [judge_scores[i] for i in idx])
    m["kappa"] = cohen_kappa([heldout[i].label == 1 for i in idx], gold_flags)
    print(f"gold validation: kappa {m['kappa']:.3f}  precision {m['precision']:.3f}  "
          f"recall {m['recall']:.3f}  (n {m['n']}, {m['tp'] + m['fn']} harmful)")
    return m


def print_evaluation(ev: Evaluation) -> None:
    m = ev.metrics
    print(f"held-out: accuracy {m['accuracy']:.4f}  AUC {m['auc']:.4f}  "
          f"precision {m['precision']:.4f}  recall {m['recall']:.4f}  ({ev.seconds:.0f}s)")
    for k, v in ev.rates.items():
        print(f"  {k:40s} n={v['n']:4d}  flag rate {v['flag_rate']:.3f}  (classifier alone "
              f"{ev.rates_model[k]['flag_rate']:.3f})")
