"""TAR: tamper-resistant safeguards, first-order (Tamirisa et al., 2024, arXiv 2408.00761).

Per step, with w the trainable (LoRA) parameters:

    w_0 = w;  w_{k+1} = w_k - eta * grad CE_harm(w_k; H_k)      k = 0..K-1  (simulated harmful fine-tune,
                                                                  plain SGD, a fresh harmful batch H_k)
    L_TR(w_K) = -H(p_{w_K}) on the answer tokens of another harmful batch H_TR
              = mean over answer positions of sum_v p_v log p_v  (TAR's negative-entropy TR loss)
    g = grad CE_align(w) + lambda * grad_{w_K} L_TR(w_K)       (first-order: dw_K/dw taken as I)

so the update pushes the *attacked* model towards maximal uncertainty on harmful answers while the
current model keeps its alignment loss. The attack runs on the live LoRA weights, which are restored
bit for bit from saved copies afterwards; the TR gradient is added to ``.grad`` after the retain
``backward`` (and a test checks the resulting update differs from SFT's and equals this sum).
"""

from __future__ import annotations

import torch
from pydantic import Field

from alignshield.align import ALIGN_METHODS
from alignshield.align._harmful import HarmfulBatches, restored
from alignshield.data.collate import IGNORE_INDEX
from alignshield.config import MethodParams


class TARParams(MethodParams):
    """TAR's settings. Paper / reference (rishub-tamirisa/tamper-resistance): 64 inner attack steps,
    adversary lr 2e-5, tamper-resistance gradient scale 4.0 (retain scale 1.0). Their attack is AdamW on
    all weights; ours is SGD on the LoRA weights, for which a larger ``inner_lr`` is usually needed."""

    inner_steps: int = Field(64, gt=0)
    """K: simulated harmful fine-tuning steps per outer step (each a fresh harmful batch)."""
    inner_lr: float = Field(2e-5, gt=0)
    """eta: SGD learning rate of the simulated attack."""
    tr_weight: float = Field(4.0, ge=0)
    """lambda: weight of the tamper-resistance gradient relative to the retain (alignment CE) gradient."""


def negative_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean of sum_v p_v log p_v over the positions that predict answer tokens (labels != -100)."""
    mask = labels[:, 1:] != IGNORE_INDEX
    if not mask.any():  # answers cut off by max_length: no tamper-resistance signal (not NaN)
        return logits.sum() * 0
    logits = logits[:, :-1]
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)[mask]
    return (logp.exp() * logp).sum(-1).mean()


@ALIGN_METHODS.register("tar")
class TARTrainer(HarmfulBatches):
    Params = TARParams
    method_name = "tar"

    def tamper_gradient(self) -> list[torch.Tensor]:
        """lambda * grad L_TR at the attacked weights; the weights are left exactly as found."""
        p = self.params
        params = self.params_with_grad()
        with restored(params):
            for k in range(p.inner_steps):
                _, g = self.loss_gradient(self.harmful_batch(salt=k + 1))
                with torch.no_grad():
                    for q, gq in zip(params, g):
                        q.sub_(p.inner_lr * gq.to(q.dtype))
            probe = self.harmful_batch(salt=0)
            with self.accelerator.no_sync(self.model):
                logits = self.model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
                tr = negative_entropy(logits, probe["labels"])
                grads = torch.autograd.grad(tr, params, allow_unused=True)
            self.last_tr_loss = tr.item()
        return [p.tr_weight * (torch.zeros_like(q) if g is None else g) for q, g in zip(params, grads)]

    def method_step(self, batch):
        extra = self.tamper_gradient()
        loss = self.compute_loss(self.model, batch)
        self.accelerator.backward(loss / self.args.grad_accum)
        self.add_gradient(extra)
        return loss.detach()
