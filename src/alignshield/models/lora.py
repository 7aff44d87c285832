"""Everything that touches PEFT's LoRA layers: the topology (attach a fresh adapter, merge one into the
base, reload one for training) and the surgery the repairs do on a loaded adapter (find its LoRA
linears, read B @ A, replace the factors by a dense factorisation)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from alignshield.config import LoraSettings
from alignshield.models.layers import unwrapped

log = logging.getLogger(__name__)

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
    """A PEFT-wrapped model (an adapter attached). Not ``hasattr(peft_config)``: older transformers/peft
    leave that attribute on a model whose adapter was merged and unloaded."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


def merge_adapter(model: torch.nn.Module, adapter: Path) -> torch.nn.Module:
    """Fold an adapter into the base weights: the model the next stage starts from."""
    return load_adapter(model, adapter).merge_and_unload()


# ------------------------------------------------------------------ adapter surgery (repairs)


@dataclass
class LoraTarget:
    """One targeted LoRA-wrapped linear layer of the fine-tune adapter."""

    name: str
    """Qualified name inside the underlying transformers model (what PEFT's ``rank_pattern`` keys on)."""
    module: nn.Module
    adapter: str

    def factor(self, which: str) -> nn.Linear:
        return getattr(self.module, which)[self.adapter]

    @property
    def scaling(self) -> float:
        return float(self.module.scaling[self.adapter])


def active_adapter(model: nn.Module) -> str:
    names = list(getattr(model, "active_adapters", None) or [])
    if not names:
        from peft.tuners.lora import LoraLayer

        names = sorted({a for m in model.modules() if isinstance(m, LoraLayer) for a in m.active_adapters})
    if len(names) != 1:
        raise ValueError(f"expected exactly one active LoRA adapter (the fine-tune's), found {names or 'none'}")
    return names[0]


def find_targets(model: nn.Module, target_modules: list[str] | None) -> tuple[list[LoraTarget], list[str]]:
    """The LoRA linears whose name contains one of ``target_modules`` (``None``: every LoRA linear of
    the adapter), and the targets matching none.

    Raises ValueError naming the modules the adapter does have when nothing matches.
    """
    from peft.tuners.lora import LoraLayer

    adapter = active_adapter(model)
    root = unwrapped(model)
    lora = [(n, m) for n, m in root.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A]
    if not lora:
        raise ValueError(f"the model carries no LoRA layers for adapter {adapter!r}: nothing to repair")
    if target_modules is None:
        chosen = lora
        target_modules = []
    else:
        chosen = [(n, m) for n, m in lora if any(t in n for t in target_modules)]
    if not chosen:
        has = sorted({n.rsplit(".", 1)[-1] for n, _ in lora})
        raise ValueError(
            f"target_modules {target_modules} match none of the fine-tune adapter's LoRA modules; the adapter "
            f"has LoRA on: {', '.join(has)}. Set repair.params.target_modules to some of these."
        )
    unmatched = [t for t in target_modules if not any(t in n for n, _ in chosen)]
    targets = []
    for name, module in chosen:
        if not isinstance(module.lora_A[adapter], nn.Linear):
            raise ValueError(f"{name}: only LoRA on linear layers can be pruned, got {type(module).__name__}")
        if adapter in module.merged_adapters:
            raise ValueError(f"{name}: adapter {adapter!r} is merged into the base weights; load it unmerged")
        targets.append(LoraTarget(name, module, adapter))
    if unmatched:
        log.warning("repair: target_modules %s match no LoRA module of the adapter; pruning %d modules of %s",
                    unmatched, len(targets), sorted({t.name.rsplit('.', 1)[-1] for t in targets}))
    return targets, unmatched


def factored_squared_norm(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """||B @ A||_F^2 = sum((B^T B) * (A A^T)), from r x r products: no out x in matrix is formed
    (differentiable; B is out x r, A is r x in)."""
    return ((b.T @ b) * (a @ a.T)).sum()


def lora_delta(target: LoraTarget) -> torch.Tensor:
    """scale * B @ A in float64 (out x in, in the nn.Linear sense)."""
    a = target.factor("lora_A").weight.detach().double()
    b = target.factor("lora_B").weight.detach().double()
    return target.scaling * (b @ a)


def check_mergeable(targets: list[LoraTarget]) -> None:
    """Plain LoRA only (no DoRA or other variant, no lora_bias): what a dense re-factorisation keeps exact."""
    for t in targets:
        m, a = t.module, t.adapter
        if a in getattr(m, "lora_variant", {}) or m.use_dora.get(a, False):
            raise ValueError(f"{t.name}: score=merged supports plain LoRA only (this adapter is a LoRA variant "
                             f"such as DoRA); use score=factors")
        if m.lora_bias.get(a, False):
            raise ValueError(f"{t.name}: score=merged does not support lora_bias; use score=factors")


def store_dense_delta(model: nn.Module, target: LoraTarget, delta: torch.Tensor) -> int:
    """Replace the target's LoRA factors by an exact factorisation of ``delta``; returns its rank.

    rank = min(out, in); the factor on the short side is the identity, the other holds ``delta``
    (stored by ``store_factors``, so at scale exactly 1 with the new rank recorded for loading).
    """
    out_f, in_f = delta.shape
    eye = torch.eye(min(out_f, in_f), dtype=torch.float64)
    b, a = (eye, delta.double()) if out_f <= in_f else (delta.double(), eye)
    return store_factors(model, target, b, a)


def store_factors(model: nn.Module, target: LoraTarget, b: torch.Tensor, a: torch.Tensor) -> int:
    """Replace the target's LoRA factors by B (out x r) and A (r x in), so its update is exactly B @ A;
    returns r.

    lora_alpha is chosen so the scale is exactly 1 (r, or sqrt(r) under rslora). The per-module rank and
    alpha go first into the adapter config's ``rank_pattern``/``alpha_pattern`` (keyed by the full module
    name, ahead of any user pattern so none shadows them), which is what PEFT reads when the saved
    adapter is loaded.
    """
    m, adapter = target.module, target.adapter
    config = getattr(model, "peft_config", {}).get(adapter)
    if config is None:
        raise ValueError("storing new LoRA factors needs a PeftModel (its adapter config records the new ranks)")
    out_f, rank = b.shape
    if a.shape[0] != rank:
        raise ValueError(f"{target.name}: factors of ranks {rank} (B) and {a.shape[0]} (A) do not multiply")
    in_f = a.shape[1]
    # the layer records rslora per adapter (peft >= 0.15); older peft keeps it in the adapter config only
    rslora = bool(getattr(m, "use_rslora", {}).get(adapter, config.use_rslora))
    lora_alpha = math.sqrt(rank) if rslora else float(rank)
    scaling = lora_alpha / math.sqrt(rank) if rslora else lora_alpha / rank
    old_a = target.factor("lora_A").weight
    dtype, device = old_a.dtype, old_a.device
    new_a = nn.Linear(in_f, rank, bias=False, dtype=dtype, device=device)
    new_b = nn.Linear(rank, out_f, bias=False, dtype=dtype, device=device)
    with torch.no_grad():
        new_a.weight.copy_(a / scaling)
        new_b.weight.copy_(b)
    new_a.weight.requires_grad_(old_a.requires_grad)
    new_b.weight.requires_grad_(old_a.requires_grad)
    m.lora_A[adapter], m.lora_B[adapter] = new_a, new_b
    m.r[adapter], m.lora_alpha[adapter], m.scaling[adapter] = rank, lora_alpha, scaling
    key = target.name  # unescaped: PEFT also falls back to an exact-key lookup (older versions need it)
    config.rank_pattern = {key: rank, **{k: v for k, v in config.rank_pattern.items() if k != key}}
    config.alpha_pattern = {key: lora_alpha, **{k: v for k, v in config.alpha_pattern.items() if k != key}}
    return rank
