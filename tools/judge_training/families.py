"""The kinds of (prompt, answer) pair the judge is trained and measured on, and how many of each."""

from __future__ import annotations

import random
from dataclasses import dataclass

DEFAULT_SEED = 1234

# label 1 = harmful, 0 = safe. "Hard negative" families have a <= 10 % flag-rate target.
POSITIVE_FAMILIES = ("harmful", "harmful_format")
HARD_NEGATIVE_FAMILIES = ("refusal", "informative_safe", "off_topic", "degenerate", "prompt_repeat")
OTHER_NEGATIVE_FAMILIES = ("safe_formatted", "benign_task")
# The gold set (judge/gold_answers.jsonl): the pipeline's own answers, labelled by hand (docs/judge.md).
# Its train part trains ("gold", plus "gold_48": the same answers cut at 48 tokens, with their own
# label) except a validation slice by prompt, which picks the threshold; its test part never trains.
GOLD_FAMILIES = ("gold", "gold_48")
FAMILIES = POSITIVE_FAMILIES + HARD_NEGATIVE_FAMILIES + OTHER_NEGATIVE_FAMILIES + GOLD_FAMILIES
GOLD_FILE = "judge/gold_answers.jsonl"
GOLD_LABEL = {"harmful": 1, "not": 0}  # borderline answers are reported apart, never trained on
# Prompt pools of the gold TEST part: no prompt of them ever trains the judge (any family)
HELDOUT_ADVBENCH_FROM = 400  # AdvBench goals [400, 520)
# Unlabelled diagnostics (flag rate only, never trained on, not in the held-out accuracy).
DIAGNOSTIC_FAMILIES = ("diag_advbench_opening", "diag_beavertails_ambiguous")

# How many pairs per family are drawn for training / held out (fewer if fewer exist).
TRAIN_QUOTA = {
    "harmful": 1200, "harmful_format": 600,
    "refusal": 550, "informative_safe": 1300, "off_topic": 800, "degenerate": 450,
    "prompt_repeat": 350, "safe_formatted": 250, "benign_task": 250,
    "gold": 100_000, "gold_48": 100_000,  # all of them
}
HELDOUT_QUOTA = {
    "harmful": 500, "harmful_format": 360,
    "refusal": 200, "informative_safe": 200, "off_topic": 200, "degenerate": 200,
    "prompt_repeat": 200, "safe_formatted": 100, "benign_task": 100,
    "diag_advbench_opening": 100, "diag_beavertails_ambiguous": 150,
    "gold": 100_000, "gold_48": 100_000,  # the gold train part's held-out slice: the validation set
}

# Per-family loss weights: the safe answers that share a topic with harmful ones (informative_safe)
# and the off-topic answers count 1.5 times, trading a little recall for fewer false flags there; the
# hand-labelled answers of the pipeline itself (gold) count most: they are the distribution judged.
FAMILY_LOSS_WEIGHT = {"informative_safe": 1.5, "off_topic": 1.5, "gold": 15.0, "gold_48": 7.5}


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    label: int  # 1 harmful, 0 safe, -1 unlabelled diagnostic
    family: str
    variant: str = ""


def family_rng(seed: int, *parts: str) -> random.Random:
    """The random stream of one named step (a family, a draw, the batches): independent of the others."""
    return random.Random(f"{seed}:" + ":".join(parts))
