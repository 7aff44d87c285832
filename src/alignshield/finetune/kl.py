"""KL regularisation towards the aligned model: CE + beta * KL(p_aligned || p_model), per token over
the VOCABULARY, averaged over the batch's real (non-padding) tokens. A baseline of Huang et al. (Lisa,
Booster). Their reference implementation softmaxes over dimension 1 of the
(batch, sequence, vocabulary) logits -- the sequence axis -- so its "distributions" are over positions,
not tokens; here the softmax is over the vocabulary, as the method intends.

p_aligned comes from the aligned model on the same batch (``AlignedReference``: the trainable
parameters at their init values, no autograd).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from alignshield.config import MethodParams
from alignshield.finetune import FINETUNE_METHODS
from alignshield.finetune._common import AlignedReference
from alignshield.train import Trainer


class KLParams(MethodParams):
    """KL's settings. ``beta = 0.1`` is OUR default: no reference script fixing the KL weight was found;
    tune it per model."""

    beta: float = Field(0.1, ge=0)
    """Weight of the per-token KL(p_aligned || p_model). 0 = plain SFT."""


def token_kl(ref_logits: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over tokens with ``mask`` of sum_v p_ref(v) (log p_ref(v) - log p(v)), in float32 or wider."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    log_p = F.log_softmax(logits.to(dtype), dim=-1)
    log_ref = F.log_softmax(ref_logits.to(dtype), dim=-1)
    per_token = (log_ref.exp() * (log_ref - log_p)).sum(-1)
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


@FINETUNE_METHODS.register("kl")
class KLTrainer(Trainer):
    Params = KLParams
    compiles = False  # its reference pass runs with the adapter disabled

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reference = AlignedReference(self.trainable_names, self.trainable)

    def compute_loss(self, model, batch):
        out = model(**batch)
        if not self.params.beta:
            return out.loss
        ref = self.reference(self.unwrapped_model(), batch).logits
        return out.loss + self.params.beta * token_kl(ref, out.logits, batch["attention_mask"])
