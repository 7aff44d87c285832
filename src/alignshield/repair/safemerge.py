"""SafeMERGE: merge the fine-tune LoRA with a safety LoRA where it leaves the alignment subspace
(Djuhera et al., 2025, arXiv 2503.17239; aladinD/SafeMERGE).

For every LoRA module of the fine-tune adapter (#2: B, A, scale s), with Safe LoRA's test
(repair/safelora.py):

    C   = V V^T / ||V||_F,   V = the module's alignment delta (LoRA #1: s1 * B1 @ A1)
    cos = cos(vec(C B A), vec(B A))

a module with cos < ``threshold`` is merged with the safety LoRA (B1, A1, s1) by PEFT's ``linear``
combination with weights (w_ft, w_safe) = ``weights``, factor by factor:

    B' = sqrt(w_ft s) B + sqrt(w_safe s1) B1,   A' = sqrt(w_ft s) A + sqrt(w_safe s1) A1,   dW' = B' A'

(so dW' = w_ft dW + w_safe V + the cross terms sqrt(w_ft w_safe s s1) (B A1 + B1 A), as in the
reference, which calls PEFT's ``_generalized_task_arithmetic_weighted_adapter``); any other module
keeps dW' = s B A (weights (1, 0)). dW' is stored back in LoRA #2 at its rank and scale.

Reference: aladinD/SafeMERGE at ``2af08c1``: ``utils.py:168-298`` (``add_weighted_adapter_safelora``;
the cosine test ``:80-118``, rounded there to 5 decimals; C ``:68-74``), defaults in
``get_safemerge_model.py:80-84`` (``--cos_threshold 0.35``, ``--weighting [0.8, 0.2]``,
``--merge_type linear``). Deviations, named:

* The safety LoRA is our alignment LoRA (#1), trained on the safety data; the reference loads a LoRA
  fine-tuned on safety data on top of the chat model. C comes from the same LoRA (the reference: chat
  model minus its base), as for ``safelora``.
* A fine-tune module without a safety LoRA keeps its update; the reference leaves such a module of
  the merged adapter at zero (``utils.py:262-266``: ``continue`` after zeroing it).
* ``merge_type=dare_linear`` (the reference's option, random drops) is not implemented.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator

from alignshield.config import MethodParams
from alignshield.repair import REPAIR_METHODS
from alignshield.repair.prune import find_targets
from alignshield.repair.safelora import alignment_lora, factor_norm2, factor_similarity, require_alignment_lora


class SafeMERGEParams(MethodParams):
    """SafeMERGE's settings; the defaults are the reference script's (``get_safemerge_model.py:80-84``)."""

    threshold: float = Field(0.35, ge=-1, le=1)
    """Merge the modules whose cos(C dW, dW) is below this."""
    weights: tuple[float, float] = (0.8, 0.2)
    """(fine-tune, safety) weights of the linear merge, both >= 0."""
    target_modules: list[str] | None = None
    """Substrings of module names to consider; None = every LoRA module of the fine-tune adapter."""

    @field_validator("weights")
    @classmethod
    def _non_negative(cls, weights: tuple[float, float]) -> tuple[float, float]:
        if min(weights) < 0:
            raise ValueError("both weights must be >= 0")
        return weights


def linear_merge(b: torch.Tensor, a: torch.Tensor, scale: float, b1: torch.Tensor, a1: torch.Tensor,
                 scale1: float, weights: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``linear`` combination of two LoRAs of one rank: (B', A') with dW' = B' @ A' (scale 1)."""
    w_ft, w_safe = math.sqrt(weights[0] * scale), math.sqrt(weights[1] * scale1)
    return w_ft * b + w_safe * b1, w_ft * a + w_safe * a1


@REPAIR_METHODS.register("safemerge")
class SafeMERGE:
    Params = SafeMERGEParams
    edits = True
    uses_alignment = True
    """The repair stage passes ``align_adapter`` (LoRA #1's folder) and ``topology``."""

    def repair(self, model, calibration, params: SafeMERGEParams, *, seed: int, pad_token_id: int | None = None,
               align_adapter: Path | None = None, topology: str = "two-lora") -> dict[str, Any]:
        scale1, safety = alignment_lora(require_alignment_lora("safemerge", align_adapter, topology))
        targets, _ = find_targets(model, params.target_modules or [""])
        sims, merged, kept_no_safety = {}, [], []
        with torch.no_grad():
            for t in targets:
                b_w, a_w = t.factor("lora_B").weight, t.factor("lora_A").weight
                if t.name not in safety:
                    kept_no_safety.append(t.name)
                    continue
                b1, a1 = safety[t.name]
                if b1.shape[1] != b_w.shape[1] or b1.shape[0] != b_w.shape[0] or a1.shape[1] != a_w.shape[1]:
                    raise ValueError(f"{t.name}: safemerge's linear merge needs the two LoRAs at one rank and shape "
                                     f"(fine-tune r={b_w.shape[1]}, alignment r={b1.shape[1]}): set finetune.lora.r "
                                     "equal to align.lora.r")
                p1 = scale1 * b1  # V = p1 @ a1
                if not factor_norm2(p1, a1) > 0:
                    kept_no_safety.append(t.name)
                    continue
                sims[t.name] = factor_similarity(p1, a1, b_w, a_w)
                if sims[t.name] >= params.threshold:
                    continue
                new_b, new_a = linear_merge(b_w.double(), a_w.double(), t.scaling, b1, a1, scale1, params.weights)
                root = math.sqrt(t.scaling)  # stored at the fine-tune LoRA's scale s: s * (B'/√s) (A'/√s) = B' A'
                b_w.copy_((new_b / root).to(b_w.dtype))
                a_w.copy_((new_a / root).to(a_w.dtype))
                merged.append(t.name)
        return {"merged": sorted(merged), "n_merged": len(merged), "n_modules": len(targets),
                "kept_no_safety_lora": sorted(kept_no_safety), "similarity": {n: round(s, 6) for n, s in sims.items()}}

