"""Shared pruning machinery for the repair methods, and the two ablations of Antidote.

Every pruning repair here does the same thing: for each targeted LoRA module of the fine-tune
adapter, give every entry of ``lora_A`` (r x in) and ``lora_B`` (out x r) a score, and zero the k
highest-scoring entries of every output row, with

    k = floor(alpha * in_features)      (in_features = the row length: ``in`` for A, ``r`` for B)

``alpha`` is read as the decimal you wrote (0.29 * 100 gives 29, not the float 28.999...). With a
small rank and a small alpha, k can be 0 for ``lora_B`` (r = 8, alpha = 0.1 -> floor(0.8) = 0): that
factor is then left untouched and the report says so (``k: 0``). The reference zeroes
``in - int(in * (1 - alpha))`` entries per row, i.e. ceil(alpha * in) whenever alpha * in is not an
integer; see ``docs/methods/antidote.md``.

Methods differ only in the score (``zero_top_k_per_row`` is the one place entries are zeroed):

* ``antidote`` (``antidote.py``): Wanda score |W_ij| * sqrt(mean x_j^2) on harmful calibration data.
* ``magnitude-prune``: |W_ij|, no data.
* ``random-prune``: iid uniform scores, i.e. a uniformly random k-subset of every row, from ``seed``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable

import torch
from pydantic import Field
from torch import nn

from alignshield.config import MethodParams
from alignshield.repair import REPAIR_METHODS
from alignshield.seeding import generator

log = logging.getLogger(__name__)

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj"]
FACTORS = ("lora_A", "lora_B")


class PruneParams(MethodParams):
    """Settings shared by every pruning repair (Antidote and its ablations).

    Defaults are the paper's (Huang et al., "Antidote: Post-fine-tuning Safety Alignment for Large
    Language Models against Harmful Fine-tuning", arXiv 2408.09600) and its reference code
    (git-disl/Antidote): alpha = 0.1 (``--dense_ratio 0.1``, SST-2 scripts; 0.05 for GSM8K and
    AG News), LoRA on q_proj, k_proj, v_proj.
    """

    alpha: float = Field(0.1, gt=0, lt=1)
    """Fraction of each output row to zero: k = floor(alpha * in_features) entries per row of every
    pruned matrix. Paper default 0.1; the paper sweeps 0.01 to 0.25. Must lie strictly in (0, 1)."""
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS), min_length=1)
    """LoRA modules of the fine-tune adapter to prune, matched as substrings of module names (so
    ``q_proj`` matches ``model.layers.3.self_attn.q_proj``). Names that match nothing are reported
    and skipped; it is an error when none matches. Default = the reference's LoRA targets."""


def per_row_k(alpha: float, in_features: int) -> int:
    """floor(alpha * in_features), with alpha taken as its shortest decimal form (no float slop)."""
    return min(in_features, math.floor(Fraction(repr(float(alpha))) * in_features))


def zero_top_k_per_row(weight: torch.Tensor, score: torch.Tensor, k: int) -> torch.Tensor:
    """Zero, in place, the ``k`` highest-scoring entries of every row of ``weight``; return that mask.

    Ties go to the lower column index (stable sort), so equal inputs always give equal masks.
    """
    if score.shape != weight.shape:
        raise ValueError(f"score shape {tuple(score.shape)} differs from weight shape {tuple(weight.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(weight.shape)}")
    if not torch.isfinite(score).all():
        raise ValueError("scores contain NaN or infinity (are the adapter weights finite?)")
    mask = torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
    if k > 0:
        top = torch.argsort(score.to(weight.device), dim=1, descending=True, stable=True)[:, :k]
        mask.scatter_(1, top, True)
        with torch.no_grad():
            weight.masked_fill_(mask, 0)
    return mask


# ----------------------------------------------------------------------------- the adapter's modules


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


def find_targets(model: nn.Module, target_modules: list[str]) -> tuple[list[LoraTarget], list[str]]:
    """The LoRA linears whose name contains one of ``target_modules``, and the targets matching none.

    Raises ValueError naming the modules the adapter does have when nothing matches.
    """
    from peft.tuners.lora import LoraLayer

    adapter = active_adapter(model)
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    lora = [(n, m) for n, m in root.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A]
    if not lora:
        raise ValueError(f"the model carries no LoRA layers for adapter {adapter!r}: nothing to repair")
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


# ----------------------------------------------------------------------------- pruning and the report

ScoreFn = Callable[[LoraTarget, str, torch.Tensor], torch.Tensor]


def matrix_entry(matrix: torch.Tensor, mask: torch.Tensor, k: int) -> dict[str, Any]:
    """What was done to one matrix: its shape, k per row, entries zeroed, and the sparsity reached."""
    numel = matrix.numel()
    zeroed = int(mask.sum())
    return {
        "shape": list(matrix.shape),
        "k": k,
        "zeroed": zeroed,
        "fraction_zeroed": round(zeroed / numel, 6),
        "sparsity": round(int((matrix == 0).sum()) / numel, 6),  # zeros after the edit, old ones included
    }


def prune_factors(targets: list[LoraTarget], alpha: float, score_of: ScoreFn) -> dict[str, Any]:
    """Zero the top-k-per-row entries of each target's ``lora_A`` and ``lora_B`` by ``score_of``."""
    modules: dict[str, Any] = {}
    total = zeroed = 0
    untouched = []
    for t in targets:
        entry = {}
        for which in FACTORS:
            weight = t.factor(which).weight
            k = per_row_k(alpha, weight.shape[1])
            with torch.no_grad():
                mask = zero_top_k_per_row(weight, score_of(t, which, weight.detach()), k)
            entry[which] = matrix_entry(weight.detach(), mask, k)
            total += weight.numel()
            zeroed += entry[which]["zeroed"]
            if k == 0:
                untouched.append(f"{t.name}.{which}")
        modules[t.name] = entry
    if untouched:
        log.warning("repair: alpha=%s gives k=0 for %d matrices (rows too short), left unchanged, e.g. %s",
                    alpha, len(untouched), untouched[0])
    return summary(modules, zeroed, total, k_zero=len(untouched))


def summary(modules: dict[str, Any], zeroed: int, total: int, k_zero: int) -> dict[str, Any]:
    return {
        "k_rule": "floor(alpha * in_features) per output row",
        "modules": modules,
        "total_zeroed": zeroed,
        "total_weights": total,
        "fraction_zeroed": round(zeroed / total, 6) if total else 0.0,
        "matrices_with_k_zero": k_zero,
    }


def _generator(seed: int, key: str) -> torch.Generator:
    """A generator per matrix from (seed, name): a mask does not depend on which other modules exist."""
    return generator(seed, "prune", key)


class _PruneRepair:
    """Base of the pruning repairs: ``score`` is all a subclass defines."""

    Params = PruneParams
    edits = True
    name = ""

    def score(self, target: LoraTarget, which: str, weight: torch.Tensor, seed: int) -> torch.Tensor:
        raise NotImplementedError

    def repair(self, model, calibration, params: PruneParams, *, seed: int, pad_token_id: int | None = None):
        targets, unmatched = find_targets(model, params.target_modules)
        report = prune_factors(targets, params.alpha, lambda t, w, m: self.score(t, w, m, seed))
        return {"method": self.name, "alpha": params.alpha, "score": "factors", "n_calibration": 0,
                "unmatched_targets": unmatched, **report}


@REPAIR_METHODS.register("magnitude-prune")
class MagnitudePrune(_PruneRepair):
    """Ablation: zero the k largest |W_ij| per row of each LoRA factor (no calibration data)."""

    name = "magnitude-prune"

    def score(self, target, which, weight, seed):
        return weight.abs()


@REPAIR_METHODS.register("random-prune")
class RandomPrune(_PruneRepair):
    """Ablation (the reference's ``random_prune``, with the same per-row count as Antidote): zero k
    uniformly random entries per row, drawn from ``seed`` and the matrix's name."""

    name = "random-prune"

    def score(self, target, which, weight, seed):
        g = _generator(seed, f"{target.name}.{which}")
        return torch.rand(weight.shape, generator=g, dtype=torch.float64)
