"""Alignment-stage methods (the provider's side): each is a Trainer subclass registered by name."""

from alignshield.registry import Registry

ALIGN_METHODS: Registry = Registry("align method")

from alignshield.align import booster, lox, repnoise, sft, tar, tvaccine, vaccine  # noqa: E402,F401  (registers the built-in methods)
