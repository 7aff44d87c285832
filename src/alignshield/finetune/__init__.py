"""Fine-tuning-stage methods (the user's side, or a provider's defence during it)."""

from alignshield.registry import Registry
from alignshield.train import Trainer

FINETUNE_METHODS: Registry = Registry("finetune method")
FINETUNE_METHODS.register("sft")(Trainer)

from alignshield.finetune import ewc, kl, ldifs, lisa, vlguard  # noqa: E402,F401  (registers the baselines)
