"""What ``align_cost.py`` measures, as data: the method rows, the models, the ratios and the goals.

Nothing here imports torch: the parent process reads it to check its options and write the report,
each worker (``_align_cost_worker.py``) to build its row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple


class Row(NamedTuple):
    """A method row: its trainer and params classes as "module:name", and the params' keyword arguments,
    taken from the worker's spec."""

    trainer: str
    params: str
    kwargs: Callable[[dict], dict] = lambda spec: {}


_VACCINE = "alignshield.align.vaccine"
_TVACCINE = "alignshield.align.tvaccine"

ROWS = {
    "sft": Row("alignshield.train:Trainer", "alignshield.config:MethodParams"),
    "vaccine": Row(f"{_VACCINE}:VaccineTrainer", f"{_VACCINE}:VaccineParams", lambda s: {"refresh_every": 1}),
    "vaccine-fast": Row(f"{_VACCINE}:VaccineTrainer", f"{_VACCINE}:VaccineParams",
                        lambda s: {"refresh_every": s["fast_k"]}),
    "random-vaccine": Row(f"{_VACCINE}:RandomVaccineTrainer", f"{_VACCINE}:VaccineParams"),
    "t-vaccine": Row(f"{_TVACCINE}:TVaccineTrainer", f"{_TVACCINE}:TVaccineParams",
                     lambda s: {"layers_per_step": s["tv_layers"]}),
    "reference-vaccine": Row("_align_cost_reference:ReferenceVaccinePort", f"{_VACCINE}:VaccineParams"),
}
METHODS = list(ROWS)
# registered align / finetune methods, each with its default params (``--methods baselines``: sft + these)
BASELINES = ["repnoise", "booster", "tar", "lox", "ewc", "kl", "vlguard", "lisa", "ldifs", "surgery", "asft"]
# params a baseline needs on the benchmark's one fresh LoRA: EWC refuses a zero-initialised LoRA (its
# lora_A Fisher is 0, finetune/ewc.py); the penalty's cost per step is the same, so time it anyway
BASELINE_PARAMS = {"ewc": {"allow_fresh_lora": True}}
# a fine-tune method that reads the alignment LoRA (#1) (``uses_alignment``: asft) gets what the fine-tune
# stage gives it: LoRA #1 trained by sft on the alignment examples for this many steps (``--align-steps``),
# saved, merged into the base, and a fresh LoRA #2 on top. Its cost per step depends on the shapes and on
# which modules LoRA #1 moved (every one after a step), not on how long LoRA #1 trained.
ALIGN_STEPS = 2

MODELS = ["embedded", "deep"]
DEEP = {"layers": 24, "hidden": 256, "heads": 4, "intermediate": 1024, "vocab": 2048, "seq": 256, "batch": 8}
DEEP_QUICK = {"layers": 24, "hidden": 128, "heads": 4, "intermediate": 256, "vocab": 1024, "seq": 96, "batch": 4}
EMBEDDED = {"batch": 8, "seq": 128, "seq_quick": 64}


def shapes(quick: bool, embedded_seq: int | None) -> dict:
    """Batch size and sequence length of each model."""
    deep = DEEP_QUICK if quick else DEEP
    return {"embedded": {"batch": EMBEDDED["batch"],
                         "seq": embedded_seq or (EMBEDDED["seq_quick"] if quick else EMBEDDED["seq"])},
            "deep": {"batch": deep["batch"], "seq": deep["seq"]}}


# time ratio: (method, the method it is divided by); every baseline that ran adds <baseline>_over_sft_time
TIME_RATIOS = {
    "vaccine_over_sft_time": ("vaccine", "sft"),
    "reference_vaccine_over_sft_time": ("reference-vaccine", "sft"),
    "fast_vaccine_over_sft_time": ("vaccine-fast", "sft"),
    "random_vaccine_over_sft_time": ("random-vaccine", "sft"),
    "tvaccine_over_sft_time": ("t-vaccine", "sft"),
    "vaccine_over_reference_time": ("vaccine", "reference-vaccine"),
}
GOALS = {
    "vaccine_over_sft_time": 2.0,
    "vaccine_over_reference_time": 1.0,
    "tvaccine_over_vaccine_peak_mem": 0.6,
    "fast_vaccine_over_sft_time": 1.3,
}
