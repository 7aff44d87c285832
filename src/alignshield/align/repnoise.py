"""RepNoise: representation noising (Rosati et al., NeurIPS 2024, arXiv 2405.14577).

Per step, on an alignment batch (harmful prompts + safe answers) and a harmful batch (harmful
prompts + harmful answers, from ``align.data.harmful``):

    L = CE_align - alpha * log(1 + CE_harm) + beta * mean_l MMD^2(h_l[harmful answer tokens], N(0, I))

* The gradient ascent is bounded as in the reference (domenicrosati/representation-noising,
  ``rep_noise_loss``): it ascends log(1 + CE_harm), whose gradient alpha * grad CE / (1 + CE) fades
  as the harmful loss grows instead of driving it to infinity. (The reference also averages in
  logit-lens CEs of every hidden state; we use the final layer's CE only.)
* h_l: the output of every decoder layer l (``output_hidden_states[1:]``, the residual stream; the
  reference hooks each layer's MLP output instead), restricted to the harmful batch's answer tokens
  (labels != -100), each token a sample; each layer is compared with a fresh standard Gaussian sample
  of the same shape and the MMD terms are averaged over layers. (The reference flattens each
  example into one sample with non-answer positions zeroed.)
* MMD^2 (biased) with the reference's kernel: a sum of 5 Gaussian kernels whose bandwidths are
  the mean pairwise squared distance times 2^-2 .. 2^2 (see ``mmd2``).

The harmful batches come from ``_harmful.HarmfulBatches`` (shared with Booster and TAR).
"""

from __future__ import annotations

import torch
from pydantic import Field

from alignshield.align import ALIGN_METHODS
from alignshield.align._harmful import HarmfulBatches
from alignshield.config import MethodParams
from alignshield.data.collate import IGNORE_INDEX
from alignshield.seeding import generator


def mmd2(x: torch.Tensor, y: torch.Tensor, kernels: int = 5, kernel_mul: float = 2.0) -> torch.Tensor:
    """Biased MMD^2 between samples x (n x d) and y (m x d), Gaussian kernels as the reference's ``MMD_loss``:

        k(a, b) = sum_i exp(-||a - b||^2 / (s * kernel_mul^i)),  i = 0..kernels-1,
        s = mean_{u != v} ||z_u - z_v||^2 over z = [x; y]  /  kernel_mul^(kernels // 2)   (no gradient)
    """
    z = torch.cat([x, y])
    n = z.shape[0]
    d2 = (z.pow(2).sum(1, keepdim=True) + z.pow(2).sum(1) - 2 * z @ z.T).clamp(min=0)
    s = d2.detach().sum() / (n * n - n) / kernel_mul ** (kernels // 2)
    k = sum(torch.exp(-d2 / (s * kernel_mul ** i)) for i in range(kernels))
    nx = x.shape[0]
    return k[:nx, :nx].mean() + k[nx:, nx:].mean() - 2 * k[:nx, nx:].mean()


class RepNoiseParams(MethodParams):
    """RepNoise's settings. alpha = 0.1, beta = 1e-3: the values the Booster / T-Vaccine papers (and
    this project's issue) run RepNoise with; Rosati et al.'s reference ``rep_noise_loss`` defaults to
    beta = 1e-3 and alpha = 1 (set align.params.alpha=1 for that).
    """

    alpha: float = Field(0.1, ge=0)
    """Weight of the (log-bounded) gradient ascent on the harmful answers."""
    beta: float = Field(1e-3, ge=0)
    """Weight of the MMD between harmful hidden states and Gaussian noise."""
    mmd_kernels: int = Field(5, gt=0)
    """Number of Gaussian kernels in the MMD (reference: 5)."""
    mmd_kernel_mul: float = Field(2.0, gt=1)
    """Ratio between consecutive kernel bandwidths (reference: 2)."""


def masked_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over the answer tokens (labels != -100), as transformers computes it."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                             ignore_index=IGNORE_INDEX)


@ALIGN_METHODS.register("repnoise")
class RepNoiseTrainer(HarmfulBatches):
    Params = RepNoiseParams
    method_name = "repnoise"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.noise = generator(self.seed, "repnoise-noise", self.accelerator.process_index)
        self.last_terms: dict[str, float] = {}

    def noise_like(self, h: torch.Tensor) -> torch.Tensor:
        return torch.randn(h.shape, generator=self.noise, dtype=torch.float32).to(h.device)

    def repnoise_loss(self, model, batch, harmful) -> torch.Tensor:
        p = self.params
        align_loss = self.compute_loss(model, batch)
        out = model(input_ids=harmful["input_ids"], attention_mask=harmful["attention_mask"],
                    output_hidden_states=True)
        answer = harmful["labels"] != IGNORE_INDEX
        # a batch whose answers max_length cut off entirely has no CE (masked_ce would be NaN): 0, as causal_lm_loss
        harm_ce = masked_ce(out.logits, harmful["labels"]) if bool(answer[:, 1:].any()) else out.logits.sum() * 0
        if int(answer.sum()) < 2:  # answers cut off by max_length: no sample to compare (MMD would be NaN)
            noise = out.logits.sum() * 0
        else:
            noise = torch.stack([mmd2(h[answer].float(), self.noise_like(h[answer]), p.mmd_kernels, p.mmd_kernel_mul)
                                 for h in out.hidden_states[1:]]).mean()
        self.last_terms = {"align": align_loss.item(), "harmful_ce": harm_ce.item(), "mmd": noise.item()}
        return align_loss - p.alpha * torch.log(harm_ce + 1) + p.beta * noise

    def method_step(self, batch):
        loss = self.repnoise_loss(self.model, batch, self.harmful_batch())
        self.accelerator.backward(loss / self.args.grad_accum)
        return loss.detach()

    def method_state(self) -> dict:
        return {"noise": self.noise.get_state()}

    def load_method_state(self, state: dict) -> None:
        self.noise.set_state(state["noise"])
