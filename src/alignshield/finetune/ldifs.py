"""LDIFS: feature-space distance regularisation (Mukhoti et al., "Fine-tuning can cripple your foundation
model; preserving features may be the solution", TMLR 2024), the fine-tune-stage baseline of Huang et
al. (Booster; reference ``LDIFSTrainer`` in the git-disl code).

loss = CE + rho * (1/L) sum_l ||h_l(w) - h_l(w_aligned)||^2, with h_l the output hidden states of
decoder layer l on the batch (squared L2 norm summed over the batch's real tokens) and h_l(w_aligned)
the aligned model's, computed on the same batch without autograd (``AlignedReference``).
The reference hooks the MLP output of each layer, adds rho/2 times each layer's squared distance
(summed, padding included) and silently drops any layer whose term exceeds 0.1; here: the decoder
layer output (found structurally), the mean over layers, padding masked, nothing dropped.
"""

from __future__ import annotations

import torch
from pydantic import Field

from alignshield.config import MethodParams
from alignshield.finetune import FINETUNE_METHODS
from alignshield.finetune._common import AlignedReference, capture_outputs
from alignshield.train import Trainer


class LDIFSParams(MethodParams):
    """LDIFS's settings; rho = 1e-4 as the Booster reference scripts (script/finetune/LDIFS_*.sh)."""

    rho: float = Field(1e-4, ge=0)
    """Weight of the mean over layers of the squared feature distance. 0 = plain SFT."""


def feature_distance(features: list[torch.Tensor], reference: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """(1/L) sum_l sum_{real tokens t} ||h_l[t] - r_l[t]||^2."""
    m = mask.unsqueeze(-1)
    dtype = torch.promote_types(features[0].dtype, torch.float32)
    terms = [((h.to(dtype) - r.to(dtype)) * m).pow(2).sum() for h, r in zip(features, reference)]
    return torch.stack(terms).mean()


@FINETUNE_METHODS.register("ldifs")
class LDIFSTrainer(Trainer):
    Params = LDIFSParams
    shares_prefix = False  # the feature distance sums every row's positions

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.layout = self.discover_layers()
        self.reference = AlignedReference(self.trainable_names, self.trainable)

    def layer_features(self, model, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(the task loss, each decoder layer's output hidden states) from one forward."""
        with capture_outputs(self.layout.layers) as out:
            loss = super().compute_loss(model, batch)
        return loss, [o[-1] for o in out]

    def reference_features(self, batch) -> list[torch.Tensor]:
        with capture_outputs(self.layout.layers) as out:
            self.reference(self.unwrapped_model(), batch)
        return [o[-1] for o in out]

    def compute_loss(self, model, batch):
        if not self.params.rho:
            return super().compute_loss(model, batch)
        loss, features = self.layer_features(model, batch)
        reference = self.reference_features(batch)
        reg = feature_distance(features, reference, batch["attention_mask"])
        return loss + self.params.rho * reg
