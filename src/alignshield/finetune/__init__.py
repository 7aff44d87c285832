"""Fine-tuning-stage methods (the user's side, or a provider's defence during it)."""

from alignshield.registry import Registry
from alignshield.train import Trainer

FINETUNE_METHODS: Registry = Registry("finetune method")
FINETUNE_METHODS.register("sft")(Trainer)


@FINETUNE_METHODS.register("none")
class NoFinetune(Trainer):
    """No user fine-tune: the aligned model as the provider ships it, the "before the attack" reference.
    Its stage trains nothing and writes no adapter; a repair has nothing to edit."""

    trains = False

from alignshield.finetune import asft, ewc, kl, ldifs, lisa, surgery, vlguard  # noqa: E402,F401  (registers the baselines)
