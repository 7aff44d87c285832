"""EWC: elastic weight consolidation towards the aligned model (Kirkpatrick et al., PNAS 2017), as the
harmful-fine-tuning baseline of Huang et al. (Lisa, NeurIPS 2024; reference ``FITrainer`` in git-disl/Lisa).

At init, a diagonal Fisher F is estimated on alignment data (harmful prompts, safe answers):
F = (1/B) sum_b (d CE_b / d w)^2 over B batches -- the MEAN of squared per-batch gradients. The loss is
CE + lambda * sum_i F_i (w_i - w0_i)^2 over the trainable parameters, w0 their values at the start
(the aligned model). The reference SUMS over batches (and over the whole alignment set), so its
lambda equals ours divided by B.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from alignshield.config import MethodParams
from alignshield.finetune import FINETUNE_METHODS
from alignshield.finetune._common import alignment_pool
from alignshield.train import Trainer, causal_lm_loss


class EWCParams(MethodParams):
    """EWC's settings. The reference (git-disl/Lisa ``FITrainer``) ships no script with its lambda;
    ``lamb = 1`` is our default for the mean-normalised Fisher (reference lambda = ours / fisher_batches)."""

    lamb: float = Field(1.0, ge=0)
    """lambda: weight of sum F (w - w0)^2. 0 = plain SFT."""
    fisher_batches: int | None = Field(None, gt=0)
    """Alignment batches (of ``finetune.train.batch_size``, in pool order) the Fisher is averaged over;
    None = the whole pool once, as the reference. Capped at the number of batches the pool holds."""


@FINETUNE_METHODS.register("ewc")
class EWCTrainer(Trainer):
    Params = EWCParams

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        pool = alignment_pool(self, "ewc")
        self.anchor = [p.detach().clone() for p in self.trainable]
        self.fisher_batch_count = 0
        self.fisher = self.estimate_fisher(pool)

    def estimate_fisher(self, pool) -> list[torch.Tensor]:
        """Mean over batches of the squared gradient of the alignment loss; parameter ``.grad`` is untouched."""
        bs = self.args.batch_size
        n = math.ceil(len(pool) / bs)
        n = min(n, self.params.fisher_batches or n)
        model = self.unwrapped_model()
        was_training = model.training
        model.eval()
        fisher = [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for p in self.trainable]
        try:
            for b in range(n):
                batch = {k: v.to(self.accelerator.device) for k, v in self.collate(pool[b * bs:(b + 1) * bs]).items()}
                loss = causal_lm_loss(model, batch, sparse=self.args.sparse_logits, share_prefix=self.share_prefix)
                grads = torch.autograd.grad(loss, self.trainable, allow_unused=True)
                for f, g in zip(fisher, grads):
                    if g is not None:
                        f.add_(g.detach().to(f.dtype).pow(2))
        finally:
            model.train(was_training)
        self.fisher_batch_count = n
        return [f / n for f in fisher]

    def penalty(self) -> torch.Tensor:
        """sum_i F_i (w_i - w0_i)^2 over the trainable parameters."""
        return sum((f * (p.to(f.dtype) - a.to(f.dtype)).pow(2)).sum()
                   for f, p, a in zip(self.fisher, self.trainable, self.anchor))

    def compute_loss(self, model, batch):
        loss = super().compute_loss(model, batch)
        if self.params.lamb:
            loss = loss + self.params.lamb * self.penalty()
        return loss

    def train(self):
        return super().train() | {"fisher_batches": self.fisher_batch_count}
