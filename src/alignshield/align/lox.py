"""``lox``: Low-Rank Extrapolation (Perin et al., COLM 2025, arXiv 2506.15606; VITA-Group/LoX).

Training-free, after the alignment: the safety update of the aligned model is pushed further along
its own top singular directions. For every weight matrix,

    dW       = W_aligned - W_base
    dW_k     = U[:, :k] diag(S[:k]) V[:, :k]^T        (dW = U diag(S) V^T; k = 0: dW_k = dW)
    W_lox    = W_aligned + coef * dW_k

Here the aligned model is the base plus the alignment LoRA (#1), trained exactly as ``sft`` trains
it; then every LoRA module's delta s * B @ A is extrapolated and stored back in the same LoRA at the
same rank, so the fine-tune stage merges W_base + dW + coef * dW_k. The SVD is taken on the LoRA
factors (QR of B and of A^T, then the r x r core), which gives the SVD of dW exactly without forming
it. Weights the alignment does not change have dW = 0 and stay as they are, as in the reference.

Reference: VITA-Group/LoX at ``9213ce6``, ``safety/LoX.py`` (``--k`` default 0 = full rank, line 10;
``--coef`` default 1.0, line 11; the loop over every parameter with more than one dimension, lines
28-44). Deviations, named: the paper's aligned models are RLHF chat models against their base
(Llama-2-7b-chat vs Llama-2-7b), ours is the SFT LoRA alignment; the reference subtracts and adds in
bfloat16 state dicts (SVD in float32), ours factorises in float64 and stores the LoRA in its dtype.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from pydantic import Field

from alignshield.align import ALIGN_METHODS
from alignshield.config import MethodParams
from alignshield.models.lora import active_adapter, factored_squared_norm, find_targets
from alignshield.train import Trainer


class LoXParams(MethodParams):
    """LoX's settings; the defaults are the reference script's (``safety/LoX.py``, lines 10-11)."""

    k: int = Field(0, ge=0)
    """Top singular directions to extrapolate; 0 = all of them (the whole alignment delta)."""
    coef: float = 1.0
    """Extrapolation coefficient: W_aligned + coef * dW_k."""


def extrapolated_factors(b: torch.Tensor, a: torch.Tensor, scaling: float, k: int, coef: float
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors (B', A') of the same rank with scaling * B' @ A' = dW + coef * dW_k, where
    dW = scaling * B @ A; float64 in, float64 out."""
    qb, rb = torch.linalg.qr(b)  # b: out x r
    qa, ra = torch.linalg.qr(a.T)  # a: r x in
    u, s, vh = torch.linalg.svd(scaling * rb @ ra.T)  # r x r core: dW = (qb u) diag(s) (qa vh^T)^T
    keep = s.clone() if k == 0 else torch.where(torch.arange(s.numel()) < k, s, torch.zeros_like(s))
    s_new = s + coef * keep
    return (qb @ u) * (s_new / scaling), vh @ qa.T


@ALIGN_METHODS.register("lox")
class LoX(Trainer):
    """SFT alignment, then the LoX extrapolation of the trained alignment LoRA."""

    Params = LoXParams

    def train(self) -> dict[str, Any]:
        report = super().train()
        return report | {"lox": self.extrapolate()}

    @torch.no_grad()
    def extrapolate(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        model = self.unwrapped_model()
        targets, _ = find_targets(model, None)
        before = after = 0.0
        for t in targets:
            a, b = t.factor("lora_A").weight, t.factor("lora_B").weight
            new_b, new_a = extrapolated_factors(b.double(), a.double(), t.scaling, self.params.k, self.params.coef)
            before += t.scaling ** 2 * float(factored_squared_norm(b.double(), a.double()))
            after += t.scaling ** 2 * float(factored_squared_norm(new_b, new_a))
            b.copy_(new_b.to(b.dtype))
            a.copy_(new_a.to(a.dtype))
        return {"adapter": active_adapter(model), "modules": len(targets), "k": self.params.k,
                "coef": self.params.coef, "delta_norm_before": round(before ** 0.5, 6),
                "delta_norm_after": round(after ** 0.5, 6), "seconds": round(time.perf_counter() - t0, 3)}
