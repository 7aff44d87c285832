"""Post-fine-tuning repair methods: edit the fine-tune adapter (no training, except ``oneshot-patch``).

A repair method is a class with a ``Params`` model and ``repair(model, calibration, params, seed)``,
which edits the adapter weights of ``model`` (a PeftModel) in place and returns a report dict.
``none`` skips the stage. Flags on the class ask the stage for more context: ``uses_alignment``
(LoRA #1's folder), ``uses_safety_data`` (the safety pairs, tokenized), ``uses_tokenizer`` (a
``tokenize`` function for pairs of the method's own, and ``model_config``).
"""

from alignshield.config import MethodParams
from alignshield.registry import Registry

REPAIR_METHODS: Registry = Registry("repair method")


@REPAIR_METHODS.register("none")
class NoRepair:
    Params = MethodParams
    edits = False


from alignshield.repair import antidote, oneshot, prune, resta, safedelta, safelora, safemerge  # noqa: E402,F401  (registers the built-in methods)
