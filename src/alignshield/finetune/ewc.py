"""EWC: elastic weight consolidation towards the aligned model (Kirkpatrick et al., PNAS 2017), as the
harmful-fine-tuning baseline of Huang et al. (Vaccine / Lisa / Booster; reference ``FITrainer`` in
git-disl/Vaccine trainer.py, run by script/EWC_finetune/sst2.sh).

At init, a diagonal Fisher F is estimated on alignment data (harmful prompts, safe answers) over B
batches in pool order: F = sum_b (d CE_b / d w)^2 (``fisher: sum``, the reference's) or its mean over
the B batches (``fisher: mean``). The loss is CE + lambda * sum_i F_i (w_i - w0_i)^2 over the trainable
parameters, w0 their values at the start (the aligned model). Reference defaults: lambda = 1e9, F
summed over the whole alignment set (2000 pairs in batches of 5: 400 batches).

Topology. The reference REUSES the aligned LoRA (train.py: "EWC REUSE THE SAME LORA"): the fine-tune
keeps training LoRA #1, so w0 is the trained alignment adapter (``finetune.topology=single-lora``). On a
fresh zero-initialised LoRA #2 (two-lora) every lora_B is 0, so d CE / d lora_A = 0 exactly: the Fisher
of every lora_A is identically 0 and EWC would only constrain lora_B. The trainer detects that from the
weights (every trainable ``lora_B`` is exactly zero) and refuses, naming ``finetune.topology=single-lora``;
``allow_fresh_lora: true`` runs it anyway. ``EWCTrainer.topology`` says which topology the method means.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch
from pydantic import Field

from alignshield.config import MethodParams
from alignshield.finetune import FINETUNE_METHODS
from alignshield.finetune._common import alignment_pool
from alignshield.train import Trainer, causal_lm_loss

log = logging.getLogger(__name__)


class EWCParams(MethodParams):
    """EWC's settings; defaults from git-disl/Vaccine script/EWC_finetune/sst2.sh (lamb=1e9) and its
    ``FITrainer`` (squared gradients SUMMED over the whole 2000-pair alignment set, batches of 5: 400)."""

    lamb: float = Field(1e9, ge=0)
    """lambda: weight of sum F (w - w0)^2. 0 = plain SFT. 1e9 is the reference's, for ``fisher: sum``."""
    fisher: Literal["sum", "mean"] = "sum"
    """How the squared per-batch gradients combine: sum over the batches (the reference) or their mean
    (then lambda_mean = B * lambda_sum gives the same loss)."""
    fisher_batches: int | None = Field(400, gt=0)
    """Alignment batches (of ``finetune.train.batch_size``, in pool order) the Fisher is estimated on;
    capped at the number of batches the pool holds (the report's ``fisher_batches`` is the number used).
    None = the whole pool once."""
    allow_fresh_lora: bool = False
    """Run on a fresh zero-initialised LoRA (two-lora) anyway, where the Fisher of every lora_A is 0 and
    only lora_B is constrained. False: that is an error (use ``finetune.topology=single-lora``)."""


def is_fresh_lora(names: list[str], params: list[torch.Tensor]) -> bool:
    """True when the trainable parameters are a LoRA whose every ``lora_B`` is exactly zero (peft's
    initialisation): the model the adapter gives is the model under it, and d loss / d lora_A = 0."""
    b = [p for n, p in zip(names, params) if "lora_B" in n]
    return bool(b) and all(not torch.any(p) for p in b)


@FINETUNE_METHODS.register("ewc")
class EWCTrainer(Trainer):
    Params = EWCParams
    topology = "single-lora"
    """The fine-tune topology the method is defined for: the reference keeps training the aligned LoRA."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        pool = alignment_pool(self, "ewc")
        if not self.params.allow_fresh_lora and is_fresh_lora(self.trainable_names, self.trainable):
            raise ValueError(
                "ewc: the trainable LoRA is freshly zero-initialised (every lora_B is 0), so the Fisher of every "
                "lora_A is identically 0 and EWC would constrain lora_B only. The reference keeps training the "
                "aligned LoRA: set finetune.topology=single-lora (with an alignment adapter from the align stage), "
                "or finetune.params.allow_fresh_lora=true to run it anyway")
        self.anchor = [p.detach().clone() for p in self.trainable]
        self.fisher_batch_count = 0
        self.fisher = self.estimate_fisher(pool)
        zero = [n for n, f in zip(self.trainable_names, self.fisher) if not torch.any(f)]
        self.zero_fisher_tensors = len(zero)
        if zero:
            log.warning("ewc: the Fisher is identically 0 on %d of %d trainable tensors (e.g. %s): EWC does not "
                        "constrain them", len(zero), len(self.fisher), zero[0])

    def estimate_fisher(self, pool) -> list[torch.Tensor]:
        """Sum (or mean) over batches of the squared gradient of the alignment loss; ``.grad`` is untouched."""
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
        return fisher if self.params.fisher == "sum" else [f / n for f in fisher]

    def penalty(self) -> torch.Tensor:
        """sum_i F_i (w_i - w0_i)^2 over the trainable parameters."""
        return sum((f * (p.to(f.dtype) - a.to(f.dtype)).pow(2)).sum()
                   for f, p, a in zip(self.fisher, self.trainable, self.anchor))

    def compute_loss(self, model, batch):
        loss = super().compute_loss(model, batch)
        if self.params.lamb:
            loss = loss + self.params.lamb * self.penalty()
        return loss

    def method_state(self) -> dict:
        """The Fisher and the anchor: a resumed run uses exactly the ones the interrupted run estimated."""
        return {"fisher": [f.cpu() for f in self.fisher], "anchor": [a.cpu() for a in self.anchor],
                "fisher_batches": self.fisher_batch_count}

    def load_method_state(self, state: dict) -> None:
        if "fisher" not in state:  # a checkpoint from before the state was saved: keep the ones from init
            return
        device = self.trainable[0].device
        self.fisher = [f.to(device) for f in state["fisher"]]
        self.anchor = [a.to(device) for a in state["anchor"]]
        self.fisher_batch_count = state["fisher_batches"]
        self.zero_fisher_tensors = sum(not torch.any(f) for f in self.fisher)

    def train(self):
        return super().train() | {"fisher_batches": self.fisher_batch_count, "fisher": self.params.fisher,
                                  "zero_fisher_tensors": self.zero_fisher_tensors}
