"""LoRA topology: attach a fresh adapter, merge an adapter into the base, reload one for training."""

from __future__ import annotations

from pathlib import Path

import torch

from alignshield.config import LoraSettings

ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
"""Where a full-parameter fine-tune (``finetune.topology=full``) saves the whole model instead of an adapter."""


def attach_lora(model: torch.nn.Module, settings: LoraSettings):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def load_adapter(model: torch.nn.Module, adapter: Path, trainable: bool = False):
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable)


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")


def merge_adapter(model: torch.nn.Module, adapter: Path) -> torch.nn.Module:
    """Fold an adapter into the base weights: the model the next stage starts from."""
    return load_adapter(model, adapter).merge_and_unload()
