"""Booster: attenuating harmful perturbation (Huang et al., 2024, arXiv 2409.01586).

Each step takes three gradient evaluations on the trainable (LoRA) parameters w:

    g_h  = grad CE_harm(w)                                 (a harmful batch from align.data.harmful)
    w'   = w - alpha * g_h / ||g_h||                        (one simulated harmful step, global norm)
    g_h' = grad CE_harm(w')                                 (same harmful batch)
    g    = grad CE_align(w) + lambda * (g_h - g_h')

so the optimizer descends CE_align + lambda * (CE_harm(w) - CE_harm(w - alpha g_h/||g_h||)) with the
simulated step treated as a constant (the reference's first-order treatment). The weights are shifted
in place for the lookahead and restored bit for bit from saved copies. The two harmful gradients are
taken with ``torch.autograd.grad`` (``.grad`` untouched); lambda * (g_h - g_h') is then added to the
alignment gradient that ``backward`` accumulated.
"""

from __future__ import annotations

import torch
from pydantic import Field

from alignshield.align import ALIGN_METHODS
from alignshield.align._harmful import HarmfulBatches, restored
from alignshield.config import MethodParams

NORM_EPS = 1e-7


class BoosterParams(MethodParams):
    """Booster's settings; defaults from the paper and reference scripts (git-disl/Booster:
    ``lamb=5``, ``alpha=0.1``)."""

    lamb: float = Field(5.0, ge=0)
    """lambda: weight of the harmful-perturbation-attenuation term."""
    alpha: float = Field(0.1, gt=0)
    """Step size of the simulated (normalised) harmful step."""


@ALIGN_METHODS.register("booster")
class BoosterTrainer(HarmfulBatches):
    Params = BoosterParams
    method_name = "booster"

    def booster_extra(self, harmful: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """lambda * (g_h(w) - g_h(w - alpha g_h/||g_h||)); the weights are left exactly as found."""
        params = self.params_with_grad()
        _, g_h = self.loss_gradient(harmful)
        # at least float32 (bf16 would lose the norm), float64 kept as is
        norm = torch.sqrt(sum(g.to(torch.promote_types(g.dtype, torch.float32)).pow(2).sum() for g in g_h))
        with restored(params):
            with torch.no_grad():
                for p, g in zip(params, g_h):
                    p.sub_((self.params.alpha / (norm + NORM_EPS)) * g.to(p.dtype))
            _, g_shift = self.loss_gradient(harmful)
        return [self.params.lamb * (a - b) for a, b in zip(g_h, g_shift)]

    def method_step(self, batch):
        extra = self.booster_extra(self.harmful_batch())
        loss = self.compute_loss(self.model, batch)
        self.accelerator.backward(loss / self.args.grad_accum)
        self.add_gradient(extra)
        return loss.detach()
