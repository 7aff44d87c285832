"""LDIFS: feature-space distance regularisation (Mukhoti et al., "Fine-tuning can cripple your foundation
model; preserving features may be the solution", TMLR 2024), the fine-tune-stage baseline of Huang et
al. (Booster; reference ``LDIFSTrainer`` in git-disl/Booster trainer.py:772-879, also in git-disl/Antidote).

Features are computed on the training batch by the current model and by the aligned model (the latter
without autograd, ``AlignedReference``). Two forms:

- ``mode: reference`` (default, the reference's term exactly): a_l = the output of decoder layer l's MLP
  block (the reference hooks ``base_model.model.model.layers.{l}.mlp``); per layer
  t_l = rho/2 * ||a_l(w) - a_l(w_aligned)||^2 over the whole (batch, sequence, hidden) tensor, padding
  positions included; loss = CE + sum of the t_l that are < ``drop_above`` (0.1): a larger (or NaN)
  term is dropped, the reference's overflow guard, which switches the regulariser off exactly where
  the drift is large.
- ``mode: ours``: h_l = the output hidden states of decoder layer l (found structurally);
  loss = CE + rho * (1/L) sum_l sum_{real tokens t} ||h_l[t] - h_l(w_aligned)[t]||^2, padding masked,
  nothing dropped. At the same rho this is far weaker than the reference (the mean over L layers
  instead of the sum, no factor 1/2 but no padding, and a different activation).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from alignshield.config import MethodParams
from alignshield.finetune import FINETUNE_METHODS
from alignshield.finetune._common import AlignedReference, capture_outputs
from alignshield.models.layers import LayerDiscoveryError
from alignshield.train import Trainer


class LDIFSParams(MethodParams):
    """LDIFS's settings; rho = 1e-4 as the Booster reference scripts (script/finetune/LDIFS_*.sh, RHO=0.0001)."""

    rho: float = Field(1e-4, ge=0)
    """Weight of the feature distance (see ``mode``). 0 = plain SFT."""
    mode: Literal["reference", "ours"] = "reference"
    """reference: rho/2 x each layer's MLP-output squared distance, summed over layers, padding
    included, terms >= drop_above dropped (git-disl/Booster). ours: rho x the mean over layers of the
    decoder-layer-output squared distance, padding masked, nothing dropped."""
    drop_above: float | None = Field(0.1, gt=0)
    """mode=reference: a layer's term is added only if it is < drop_above (the reference's 0.1; a NaN
    term is dropped too). None = keep every term. Unused by mode=ours."""
    mlp_module: str = "mlp"
    """mode=reference: the name of the MLP child of each decoder layer."""


def feature_distance(features: list[torch.Tensor], reference: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """mode=ours: (1/L) sum_l sum_{real tokens t} ||h_l[t] - r_l[t]||^2."""
    m = mask.unsqueeze(-1)
    dtype = torch.promote_types(features[0].dtype, torch.float32)
    terms = [((h.to(dtype) - r.to(dtype)) * m).pow(2).sum() for h, r in zip(features, reference)]
    return torch.stack(terms).mean()


def reference_terms(features: list[torch.Tensor], reference: list[torch.Tensor], rho: float,
                    drop_above: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """mode=reference: (sum of the kept rho/2 ||a_l - r_l||^2, how many layers were dropped), on device."""
    dtype = torch.promote_types(features[0].dtype, torch.float32)
    terms = torch.stack([rho / 2 * (a.to(dtype) - r.to(dtype)).pow(2).sum() for a, r in zip(features, reference)])
    if drop_above is None:
        return terms.sum(), torch.zeros((), dtype=torch.long, device=terms.device)
    keep = terms < drop_above  # False for NaN too, as the reference's `if proximal_loss < 0.1`
    return torch.where(keep, terms, torch.zeros_like(terms)).sum(), (~keep).sum()


@FINETUNE_METHODS.register("ldifs")
class LDIFSTrainer(Trainer):
    Params = LDIFSParams
    shares_prefix = False  # the feature distance reads every row's positions
    compiles = False  # reads every layer's features

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.layout = self.discover_layers()
        self.hooked = self.layout.layers if self.params.mode == "ours" else self._mlps()
        """The modules whose outputs are the features: the decoder layers (ours) or their MLPs (reference)."""
        self.reference = AlignedReference(self.trainable_names, self.trainable)
        self.dropped_terms = 0
        """mode=reference: layer terms dropped (>= drop_above) over the run's training micro-batches."""
        self.terms_seen = 0
        self._dropped = None  # device counter since the last sync

    def _mlps(self) -> list[torch.nn.Module]:
        name, mlps = self.params.mlp_module, []
        for i, layer in enumerate(self.layout.layers):
            children = dict(layer.named_children())
            if name not in children:
                raise LayerDiscoveryError(
                    f"ldifs: decoder layer {i} ({type(layer).__name__} at {self.layout.layers_path}) has no "
                    f"{name!r} child; its children are {', '.join(children)}. Set finetune.params.mlp_module "
                    "or use finetune.params.mode=ours")
            mlps.append(children[name])
        return mlps

    def layer_features(self, model, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(the task loss, each hooked module's output hidden states) from one forward."""
        with capture_outputs(self.hooked) as out:
            loss = super().compute_loss(model, batch)
        return loss, [o[-1] for o in out]

    def reference_features(self, batch) -> list[torch.Tensor]:
        with capture_outputs(self.hooked) as out:
            self.reference(self.unwrapped_model(), batch)
        return [o[-1] for o in out]

    def regulariser(self, features, reference, batch) -> torch.Tensor:
        """The term added to the loss (rho included)."""
        if self.params.mode == "ours":
            return self.params.rho * feature_distance(features, reference, batch["attention_mask"])
        reg, dropped = reference_terms(features, reference, self.params.rho, self.params.drop_above)
        self._dropped = dropped if self._dropped is None else self._dropped + dropped
        self.terms_seen += len(features)
        return reg

    def compute_loss(self, model, batch):
        if not self.params.rho:
            return super().compute_loss(model, batch)
        loss, features = self.layer_features(model, batch)
        return loss + self.regulariser(features, self.reference_features(batch), batch)

    def _sync_dropped(self) -> None:
        if self._dropped is not None:
            self.dropped_terms += int(self._dropped)
            self._dropped = None

    def method_state(self) -> dict:
        self._sync_dropped()
        return {"dropped_terms": self.dropped_terms, "terms_seen": self.terms_seen}

    def load_method_state(self, state: dict) -> None:
        self.dropped_terms = state.get("dropped_terms", 0)
        self.terms_seen = state.get("terms_seen", 0)
        self._dropped = None

    def train(self):
        report = super().train()
        self._sync_dropped()
        if self.params.mode == "reference" and self.params.rho:
            report |= {"ldifs_terms": self.terms_seen, "ldifs_dropped_terms": self.dropped_terms}
        return report
