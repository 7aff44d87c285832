"""Post-fine-tuning repair methods: edit the fine-tune adapter, no training.

A repair method is a class with a ``Params`` model and ``repair(model, calibration, params, seed)``,
which edits the adapter weights of ``model`` (a PeftModel) in place and returns a report dict.
``none`` skips the stage.
"""

from alignshield.config import MethodParams
from alignshield.registry import Registry

REPAIR_METHODS: Registry = Registry("repair method")


@REPAIR_METHODS.register("none")
class NoRepair:
    Params = MethodParams
    edits = False


from alignshield.repair import antidote, prune, safedelta, safelora, safemerge  # noqa: E402,F401  (registers the built-in methods)
