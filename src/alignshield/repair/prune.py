"""Shared pruning machinery for the repair methods, and the two ablations of Antidote.

Every pruning repair here does the same thing: for each targeted LoRA module of the fine-tune
adapter, give every entry of ``lora_A`` (r x in) and ``lora_B`` (out x r) a score, and zero the k
highest-scoring entries of every output row (``in_features`` = the row length: ``in`` for A, ``r``
for B). Two options decide what is pruned:

``targets`` (which modules)
    ``adapter`` (default, the reference): every LoRA linear of the fine-tune adapter. The reference
    prunes every ``nn.Linear`` whose name contains ``lora`` in every decoder layer
    (git-disl/Antidote ``utils.py:313-337``, ``utils.py:664-667``), i.e. its whole adapter.
    ``qkv``: only q_proj, k_proj, v_proj (our former default; the reference's adapter sits on exactly
    these, ``train.py:266-270``). ``target_modules`` (explicit substrings) overrides both.

``rounding`` (how many entries per row, and which on equal scores)
    ``reference`` (default): ``k = in - int(in * (1 - alpha))`` in Python float arithmetic, exactly
    as ``prune_wanda_outlier`` builds its mask (``utils.py:711, 721-723``): each row is sorted
    ascending (stable), the first ``int(in * (1 - alpha))`` are kept and the rest, the highest
    scores, are the mask that ``train.py:534-535`` zeroes (``param *= 1 - mask``). So among equal
    scores the later column is zeroed, and k >= 1 whenever ``in * (1 - alpha)`` is not an integer
    (r = 8: 1 entry per lora_B row for any alpha in (0, 0.125]). The float slop is kept on purpose
    (alpha = 0.3, in = 90: 90 * 0.7 = 62.99999... so 28 are zeroed, not 27).
    ``floor`` (our former rule): ``k = floor(alpha * in)`` with alpha read as the decimal you wrote
    (0.29 * 100 gives 29), ties to the earlier column; k = 0 for lora_B at r = 8 and alpha < 0.125,
    the factor is then left untouched and the report says so (``k: 0``).

Methods differ only in the score (``zero_top_k_per_row`` is the one place entries are zeroed):

* ``antidote`` (``antidote.py``): Wanda score |W_ij| * sqrt(mean x_j^2) on harmful calibration data.
* ``magnitude-prune``: |W_ij|, no data.
* ``random-prune``: iid uniform scores, i.e. a uniformly random k-subset of every row, from ``seed``.

See ``docs/methods/antidote.md``.
"""

from __future__ import annotations

import logging
import math
from fractions import Fraction
from typing import Any, Callable, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from alignshield.config import MethodParams
from alignshield.models.lora import LoraTarget, find_targets
from alignshield.repair import REPAIR_METHODS
from alignshield.seeding import generator

log = logging.getLogger(__name__)

QKV_TARGETS = ["q_proj", "k_proj", "v_proj"]
FACTORS = ("lora_A", "lora_B")

Targets = Literal["adapter", "qkv"]
Rounding = Literal["reference", "floor"]

K_RULES = {
    "reference": "in_features - int(in_features * (1 - alpha)) per output row, Python float arithmetic (the "
                 "reference's prune_wanda_outlier: each row sorted ascending, stable; the first "
                 "int(in_features * (1 - alpha)) kept, the rest, the highest scores, zeroed; among equal scores "
                 "the later column is zeroed)",
    "floor": "floor(alpha * in_features) per output row, alpha read as its decimal; the highest scores zeroed, "
             "among equal scores the earlier column",
}


class PruneParams(MethodParams):
    """Settings shared by every pruning repair (Antidote and its ablations).

    Defaults are the paper's (Huang et al., "Antidote: Post-fine-tuning Safety Alignment for Large
    Language Models against Harmful Fine-tuning", arXiv 2408.09600) and its reference code
    (git-disl/Antidote): alpha = 0.1 (``--dense_ratio 0.1``, SST-2 scripts; 0.05 for GSM8K and
    AG News), the whole fine-tune adapter pruned (``targets=adapter``), and the reference's per-row
    count (``rounding=reference``, ``utils.py:prune_wanda_outlier``).
    """

    alpha: float = Field(0.1, gt=0, lt=1)
    """Fraction of each output row to zero (the reference's ``dense_ratio``); the count per row is set
    by ``rounding``. Paper default 0.1; the paper sweeps 0.01 to 0.25. Must lie strictly in (0, 1)."""
    targets: Targets = "adapter"
    """Which LoRA modules of the fine-tune adapter to prune. ``adapter`` (default, the reference): every
    LoRA linear of the adapter (the reference prunes every ``lora`` linear it finds, ``utils.py:330``).
    ``qkv``: q_proj, k_proj, v_proj only (the former default; on an adapter that sits on q/k/v only,
    as the reference's does, the two are the same)."""
    target_modules: list[str] | None = Field(None, min_length=1)
    """Explicit override of ``targets``: LoRA modules matched as substrings of module names (so
    ``q_proj`` matches ``model.layers.3.self_attn.q_proj``). Names that match nothing are reported
    and skipped; it is an error when none matches. Setting it together with ``targets`` is an error."""
    rounding: Rounding = "reference"
    """Entries zeroed per row of length ``in``. ``reference`` (default): ``in - int(in * (1 - alpha))``
    exactly as the reference computes it (float arithmetic; among equal scores the later column is
    zeroed), so every row loses at least one entry unless ``in * (1 - alpha)`` is an integer.
    ``floor``: ``floor(alpha * in)`` (the former rule; 0 for rank-8 lora_B rows when alpha < 0.125)."""

    @model_validator(mode="after")
    def _one_target_rule(self):
        if self.target_modules is not None and "targets" in self.model_fields_set:
            raise ValueError("set either targets or target_modules, not both (target_modules overrides targets)")
        return self


def per_row_k(alpha: float, in_features: int, rule: Rounding = "reference") -> int:
    """Entries zeroed in a row of ``in_features`` under ``rule``.

    ``reference``: ``in_features - int(in_features * (1 - alpha))`` in float arithmetic, as the reference
    does; ``floor``: floor(alpha * in_features) with alpha taken as its shortest decimal form.
    """
    if rule == "reference":
        return in_features - int(in_features * (1 - float(alpha)))
    if rule == "floor":
        return min(in_features, math.floor(Fraction(repr(float(alpha))) * in_features))
    raise ValueError(f"unknown rounding {rule!r}; expected 'reference' or 'floor'")


def zero_top_k_per_row(weight: torch.Tensor, score: torch.Tensor, k: int,
                       rule: Rounding = "reference") -> torch.Tensor:
    """Zero, in place, the ``k`` highest-scoring entries of every row of ``weight``; return that mask.

    Equal scores, deterministic either way: ``floor`` sorts descending (stable) and zeroes the first k,
    so the earlier column goes first; ``reference`` sorts ascending (stable), keeps the first
    ``in - k`` and zeroes the rest, as the reference does, so the later column goes first.
    """
    if score.shape != weight.shape:
        raise ValueError(f"score shape {tuple(score.shape)} differs from weight shape {tuple(weight.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(weight.shape)}")
    if not 0 <= k <= weight.shape[1]:
        raise ValueError(f"k = {k} is outside [0, {weight.shape[1]}]")
    if not torch.isfinite(score).all():
        raise ValueError("scores contain NaN or infinity (are the adapter weights finite?)")
    mask = torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
    if k > 0:
        score = score.to(weight.device)
        if rule == "reference":
            top = torch.argsort(score, dim=1, descending=False, stable=True)[:, weight.shape[1] - k:]
        elif rule == "floor":
            top = torch.argsort(score, dim=1, descending=True, stable=True)[:, :k]
        else:
            raise ValueError(f"unknown rounding {rule!r}; expected 'reference' or 'floor'")
        mask.scatter_(1, top, True)
        with torch.no_grad():
            weight.masked_fill_(mask, 0)
    return mask


# ----------------------------------------------------------------------------- the adapter's modules


def select_targets(model: nn.Module, params: PruneParams) -> tuple[list[LoraTarget], dict[str, Any]]:
    """The modules ``params`` selects (``target_modules`` if set, else ``targets``), and the report's
    account of the choice: the rule in force, the substrings used (``None`` = the whole adapter), the
    module types pruned and the substrings that matched nothing."""
    if params.target_modules is not None:
        rule, names = "target_modules", list(params.target_modules)
    elif params.targets == "qkv":
        rule, names = "qkv", list(QKV_TARGETS)
    else:
        rule, names = "adapter", None
    targets, unmatched = find_targets(model, names)
    return targets, {
        "targets": rule,
        "target_modules": names,
        "pruned_module_types": sorted({t.name.rsplit(".", 1)[-1] for t in targets}),
        "n_pruned_modules": len(targets),
        "unmatched_targets": unmatched,
    }


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


def prune_factors(targets: list[LoraTarget], alpha: float, score_of: ScoreFn, rounding: Rounding) -> dict[str, Any]:
    """Zero the top-k-per-row entries of each target's ``lora_A`` and ``lora_B`` by ``score_of``, with
    k per row and the order on equal scores given by ``rounding``."""
    modules: dict[str, Any] = {}
    total = zeroed = 0
    untouched = []
    for t in targets:
        entry = {}
        for which in FACTORS:
            weight = t.factor(which).weight
            k = per_row_k(alpha, weight.shape[1], rounding)
            with torch.no_grad():
                mask = zero_top_k_per_row(weight, score_of(t, which, weight.detach()), k, rounding)
            entry[which] = matrix_entry(weight.detach(), mask, k)
            total += weight.numel()
            zeroed += entry[which]["zeroed"]
            if k == 0:
                untouched.append(f"{t.name}.{which}")
        modules[t.name] = entry
    if untouched:
        log.warning("repair: alpha=%s with rounding=%s gives k=0 for %d matrices (rows too short), left "
                    "unchanged, e.g. %s", alpha, rounding, len(untouched), untouched[0])
    return summary(modules, zeroed, total, k_zero=len(untouched), rounding=rounding)


def summary(modules: dict[str, Any], zeroed: int, total: int, k_zero: int, rounding: Rounding) -> dict[str, Any]:
    return {
        "rounding": rounding,
        "k_rule": K_RULES[rounding],
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
        targets, selection = select_targets(model, params)
        report = prune_factors(targets, params.alpha, lambda t, w, m: self.score(t, w, m, seed), params.rounding)
        return {"method": self.name, "alpha": params.alpha, "score": "factors", "n_calibration": 0,
                **selection, **report}


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
