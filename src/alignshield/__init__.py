"""alignshield: keep a language model's safety alignment through user fine-tuning."""

__version__ = "0.1.0"
