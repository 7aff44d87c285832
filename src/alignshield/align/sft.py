"""``sft``: plain supervised alignment on harmful prompts + safe answers (the papers' SFT baseline);
``none``: no alignment at all (the papers' non-aligned baseline)."""

from alignshield.align import ALIGN_METHODS
from alignshield.train import Trainer

ALIGN_METHODS.register("sft")(Trainer)


@ALIGN_METHODS.register("none")
class NoAlignment(Trainer):
    """The base model as it is; the fine-tune stage starts from it."""

    trains = False
