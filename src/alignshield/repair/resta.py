"""RESTA: add the safety vector back to the fine-tuned model, optionally after DARE
(Bhardwaj, Anh, Poria, "Language Models are Homer Simpson! Safety Re-Alignment of Fine-tuned Language
Models through Task Arithmetic", ACL 2024, arXiv 2402.11746; reference code declare-lab/resta).

For every LoRA module of the fine-tune adapter (#2: B, A, scale s, so the fine-tune delta is
dW = s B A on top of the aligned weight W_aligned = W_base + V), with the same module's alignment
LoRA (#1: B1, A1, scale s1):

    V    = s1 B1 A1                              the safety vector (aligned - pre-alignment base)
    dW'  = dW + scale * V                        RESTA:  W_ft' = W_ft + scale * V
    DARE(X) = M * X / (1 - p)                    M_ij ~ Bernoulli(1 - p) iid  (``drop_rate`` p)

With ``drop_rate`` > 0 DARE is applied to one of the two deltas (``drop_on``):

    finetune (default):  dW' = DARE(dW) + scale * V
    safety:              dW' = dW + scale * DARE(V)

(``rescale=False`` leaves the kept entries unscaled). M is drawn per module from
``seeding.generator(seed, "resta-dare", <module name>)`` (uniform u_ij, kept where u_ij >= p), so it
depends on the seed and the module only, not on the order of the modules.

Storage (the repair stage saves LoRA #2 only): dW' replaces LoRA #2's factors, exactly.

* ``drop_rate`` = 0: rank r2 + r1, the factors concatenated at scale 1:
  B' = [s B, scale s1 B1], A' = [A; A1], so B' A' = dW + scale * V.
* ``drop_rate`` > 0: a dropped delta is dense (not low-rank), so it is stored at rank min(out, in) with the
  identity on the short side (``models.lora.store_dense_delta``, as ``antidote``'s ``score=merged``).

The new per-module rank goes into the adapter config's ``rank_pattern``/``alpha_pattern``, so the saved
adapter loads back to the same weights (up to the adapter's dtype).

Sources. The declare-lab/resta code could not be read here (no stored copy), so no default is cited to a
file:line; what follows is from the paper's abstract and two third-party summaries of its method
section (themoonlight.io and liner.com reviews of arXiv 2402.11746); the paper's body text was not read.

* The method is "a simple arithmetic addition of a safety vector to the weights of the compromised
  model" (abstract): ``scale`` = 1.0 is that plain addition. Whether the paper or its code uses another
  coefficient by default is unverified.
* The safety vector is the aligned model minus an "unaligned" one, obtained by fine-tuning the aligned
  model on harmful data (themoonlight review).
* DARE (Yu et al., 2023, arXiv 2311.03099: drop with rate p, rescale the rest by 1/(1 - p)) is applied
  to "redundant delta parameters (changes in model parameters caused by fine-tuning) before applying
  RESTA" (themoonlight review): hence ``drop_on=finetune``. The paper's drop rate was not read: the
  default ``drop_rate`` = 0 is RESTA without DARE; set it for the DARE variant.

Deviations, named:

* The safety vector is V = LoRA #1's delta (aligned minus the pre-alignment base), not the paper's
  aligned minus an unaligned model (the aligned model fine-tuned on harmful data): our pipeline trains
  no such model. Both point from a less aligned model to the aligned one.
* Only the modules that carry LoRA #2 can be edited (the stage saves LoRA #2 alone): a module with an
  alignment LoRA but no fine-tune LoRA keeps W_aligned (reported), where the paper adds the vector to
  every weight. A fine-tune module without an alignment LoRA has V = 0 (reported).
* ``drop_on=safety`` (DARE on the safety vector, as issue #20 reads the method) is an option.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from alignshield.config import MethodParams
from alignshield.models.lora import LoraTarget, find_targets, lora_delta, store_dense_delta, store_factors
from alignshield.repair import REPAIR_METHODS
from alignshield.repair.safelora import alignment_lora, require_alignment_lora
from alignshield.seeding import generator

DropOn = Literal["finetune", "safety"]


class RestaParams(MethodParams):
    """RESTA's settings. The reference code was not readable here: the defaults follow the paper's abstract
    (plain addition, ``scale`` = 1) and leave DARE off (``drop_rate`` = 0); see the module docstring."""

    scale: float = Field(1.0, ge=0, allow_inf_nan=False)
    """Coefficient of the safety vector V (>= 0): W_ft' = W_ft + scale * V. 1.0 is the paper's plain
    addition; 0 adds nothing (with ``drop_rate`` > 0 and ``drop_on=finetune``: DARE alone)."""
    drop_rate: float = Field(0.0, ge=0, lt=1)
    """DARE's drop rate p in [0, 1): each entry of the dropped delta is zeroed with probability p. 0 (default)
    is RESTA without DARE."""
    drop_on: DropOn = "finetune"
    """Which delta DARE drops: ``finetune`` (default, the paper's, as summarised: the fine-tune's delta
    s B A before the safety vector is added) or ``safety`` (the safety vector V)."""
    rescale: bool = True
    """Rescale the kept entries by 1/(1 - p), DARE's rescale (the "RE" of DARE)."""
    target_modules: list[str] | None = Field(None, min_length=1)
    """Substrings of module names to edit; None = every LoRA module of the fine-tune adapter."""

    @model_validator(mode="after")
    def _dare_options_need_a_drop(self):
        # values, not fields set: a resolved config round-trips every field at its default
        idle = [name for name, default in (("drop_on", "finetune"), ("rescale", True)) if getattr(self, name) != default]
        if self.drop_rate == 0 and idle:
            raise ValueError(f"{', '.join(idle)} only act with drop_rate > 0 (DARE); set drop_rate or drop them")
        return self


def dare(x: torch.Tensor, p: float, g: torch.Generator, rescale: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(DARE(x), keep mask): entries kept where u >= p, u ~ U[0, 1) iid from ``g`` (float64, on the CPU),
    the kept ones divided by (1 - p) when ``rescale``."""
    keep = torch.rand(x.shape, generator=g, dtype=torch.float64) >= p
    kept = x.double() * keep.to(x.device)
    return (kept / (1 - p) if rescale else kept), keep


def _plain_lora(t: LoraTarget) -> None:
    m, a = t.module, t.adapter
    if a in getattr(m, "lora_variant", {}) or m.use_dora.get(a, False) or m.lora_bias.get(a, False):
        raise ValueError(f"{t.name}: resta edits plain LoRA only (this adapter is a LoRA variant such as DoRA, "
                         "or has lora_bias)")


@REPAIR_METHODS.register("resta")
class Resta:
    Params = RestaParams
    edits = True
    uses_alignment = True
    """The repair stage passes ``align_adapter`` (LoRA #1's folder) and ``topology``."""

    def repair(self, model, calibration, params: RestaParams, *, seed: int, pad_token_id: int | None = None,
               align_adapter: Path | None = None, topology: str = "two-lora") -> dict[str, Any]:
        scale1, safety = alignment_lora(require_alignment_lora("resta", align_adapter, topology))
        every, _ = find_targets(model, None)
        targets, _ = find_targets(model, params.target_modules)
        p, beta = params.drop_rate, params.scale
        ranks, kept, ratio, no_safety, untouched = {}, {}, {}, [], []
        with torch.no_grad():
            for t in targets:
                _plain_lora(t)
                b, a = t.factor("lora_B").weight, t.factor("lora_A").weight
                factors = safety.get(t.name)
                if factors is None:
                    no_safety.append(t.name)
                elif factors[0].shape[0] != b.shape[0] or factors[1].shape[1] != a.shape[1]:
                    raise ValueError(f"{t.name}: the alignment LoRA's delta is {factors[0].shape[0]} x "
                                     f"{factors[1].shape[1]}, the fine-tune's {b.shape[0]} x {a.shape[1]}")
                has_v = factors is not None and beta > 0
                drops = p > 0 and (params.drop_on == "finetune" or has_v)
                if not has_v and not drops:
                    untouched.append(t.name)
                    continue
                delta = lora_delta(t)
                if has_v:
                    b1, a1 = (f.to(b.device) for f in factors)
                    ratio[t.name] = round(float(torch.linalg.norm(beta * scale1 * b1 @ a1)
                                                / torch.linalg.norm(delta).clamp_min(1e-300)), 6)
                if not drops:  # exact, at rank r2 + r1
                    ranks[t.name] = store_factors(model, t, torch.cat([t.scaling * b.double(), beta * scale1 * b1], 1),
                                                  torch.cat([a.double(), a1], 0))
                    continue
                g = generator(seed, "resta-dare", t.name)
                if params.drop_on == "finetune":
                    new, keep = dare(delta, p, g, params.rescale)
                    if has_v:
                        new = new + beta * scale1 * b1 @ a1
                else:
                    dropped, keep = dare(scale1 * b1 @ a1, p, g, params.rescale)
                    new = delta + beta * dropped
                kept[t.name] = round(float(keep.double().mean()), 6)
                ranks[t.name] = store_dense_delta(model, t, new)
        finetune_names = {t.name for t in every}
        report = {
            "edited": sorted(ranks), "n_edited": len(ranks), "n_modules": len(targets), "stored_rank": ranks,
            "no_alignment_lora": sorted(no_safety), "untouched": sorted(untouched),
            "alignment_without_finetune_lora": sorted(set(safety) - finetune_names),
            "safety_over_finetune_norm": ratio,
            "scale": beta, "drop_rate": p,
        }
        if p > 0:
            report.update(drop_on=params.drop_on, rescale=params.rescale, kept_fraction=kept)
        return report
