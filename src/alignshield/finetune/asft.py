"""``asft``: anchoring the fine-tune in the alignment direction (AsFT, PKU-YuanGroup/AsFT).

A provider's fine-tune defence: the user's loss plus a penalty on the part of each LoRA update that
leaves the alignment subspace, per module:

    V  = W_aligned - W_base              (here: the module's alignment LoRA #1 delta, s1 * B1 @ A1)
    C  = V V^T / ||V||_F                 (Safe LoRA's alignment matrix, repair/safelora.py)
    dW = B @ A                           (the fine-tune LoRA #2; no LoRA scaling, as the reference)
    L  = CE + lambda * sum_modules ||(I - C) dW||_F^2

The penalty is computed from factors: C = B1 G B1^T with G = s1^2 A1 A1^T / ||V||_F, so
(I - C) B = B - B1 (G (B1^T B)) is out x r and ||M A||_F^2 = sum((M^T M) * (A A^T)); no out x out or
out x in matrix is formed. Modules without an alignment LoRA (V absent or 0) are not penalised.

Reference: PKU-YuanGroup/AsFT at ``07b606e``: the penalty in ``utils/AsFT_train_utils.py:101-117``
(``reg_loss += lambda_reg * torch.norm((identity - c_hat) @ delta_w, p='fro') ** 2`` with
``delta_w = torch.mm(lora_b, lora_a)``), C in ``AsFT_finetuning.py:79-89``, lambda = 1 in
``scripts/SST2/AsFT_reg1_p_0.1.sh:18`` (``--lambda_reg 1``). As there, the penalty is added after
the CE is divided by the gradient accumulation steps, so it is not divided. Deviation, named: the
reference's V is the difference between a chat model and its base (full weights); ours is the
alignment LoRA's delta, as for ``safelora``. ``scaled_delta=true`` penalises s * B @ A instead.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field

from alignshield.config import MethodParams
from alignshield.finetune import FINETUNE_METHODS
from alignshield.models.lora import LoraTarget, factored_squared_norm, find_targets
from alignshield.repair.safelora import alignment_factors
from alignshield.train import Trainer


class AsFTParams(MethodParams):
    """AsFT's settings; lambda is the reference script's (``scripts/*/AsFT_reg1_p_0.1.sh``)."""

    lambda_reg: float = Field(1.0, ge=0)
    """Weight of sum_modules ||(I - C) dW||_F^2. 0 = plain SFT."""
    scaled_delta: bool = False
    """Penalise s * B @ A (the update the model applies) instead of the reference's unscaled B @ A."""


class _Anchor:
    """One module's alignment matrix as factors, C = B1 G B1^T, next to its fine-tune LoRA."""

    def __init__(self, target: LoraTarget, v_b: torch.Tensor, v_a: torch.Tensor):
        self.target = target
        norm = factored_squared_norm(v_b, v_a).sqrt()  # ||V||_F, V = v_b @ v_a
        self.b1, self.g = v_b, (v_a @ v_a.T) / norm

    def penalty(self, scaled: bool) -> torch.Tensor:
        b, a = self.target.factor("lora_B").weight, self.target.factor("lora_A").weight
        b1, g = self.b1.to(b), self.g.to(b)
        m = b - b1 @ (g @ (b1.T @ b))  # (I - C) B
        value = factored_squared_norm(m, a)  # ||(I - C) B A||_F^2
        return value * self.target.scaling ** 2 if scaled else value


@FINETUNE_METHODS.register("asft")
class AsFTTrainer(Trainer):
    Params = AsFTParams
    uses_alignment = True
    """Reads the alignment LoRA (#1): needs finetune.topology=two-lora and an alignment that trains."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        adapter = self.extra_data.get("align_adapter")
        if adapter is None or not (Path(adapter) / "adapter_config.json").exists():
            raise ValueError("asft anchors the fine-tune in the alignment LoRA (#1), but the alignment stage "
                             "trained none (align.method=none)")
        factors = anchor_factors(Path(adapter))
        targets, _ = find_targets(self.unwrapped_model(), None)
        self.anchors = [_Anchor(t, *factors[t.name]) for t in targets if t.name in factors
                        and factors[t.name][0].shape[0] == t.factor("lora_B").weight.shape[0]
                        and factors[t.name][1].shape[1] == t.factor("lora_A").weight.shape[1]]
        self.unanchored = sorted(t.name for t in targets if t.name not in {a.target.name for a in self.anchors})

    def train(self) -> dict:
        return super().train() | {"asft": {"anchored": len(self.anchors), "unanchored": self.unanchored}}

    def regulariser(self) -> torch.Tensor:
        return sum((a.penalty(self.params.scaled_delta) for a in self.anchors), torch.zeros(()))

    def compute_loss(self, model, batch):
        loss = super().compute_loss(model, batch)
        if not self.params.lambda_reg or not self.anchors:
            return loss
        # the reference adds the penalty after dividing the CE by the accumulation steps: undo our division
        return loss + self.params.lambda_reg * self.args.grad_accum * self.regulariser()


def anchor_factors(adapter: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The alignment LoRA's (s1 * B1, A1) per module, without the modules whose delta is 0 (no
    subspace to anchor to)."""
    return {name: (b, a) for name, (b, a) in alignment_factors(adapter).items()
            if torch.count_nonzero(b) and torch.count_nonzero(a)}
