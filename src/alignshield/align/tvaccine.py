"""T-Vaccine: targeted Vaccine on safety-critical layers (Liu et al., 2024, arXiv 2410.09760).

Every K steps each layer is scored by the norm of the gradient of a harmful-data loss with respect
to its attention output; every J steps S layers are sampled without replacement with probability
proportional to the scores. Only those layers are perturbed (Vaccine's e, with the global norm over
them) and only their LoRA parameters train. The other layers are frozen -- attention AND MLP LoRA;
the reference left MLP LoRA trainable everywhere -- and run under activation checkpointing, so
their activations are not kept and memory falls.
"""

from __future__ import annotations

import warnings

import torch
import torch.utils.checkpoint
from pydantic import Field

from alignshield.align import ALIGN_METHODS
from alignshield.align.vaccine import VaccineParams, VaccineTrainer
from alignshield.seeding import generator


class TVaccineParams(VaccineParams):
    """T-Vaccine's settings; defaults from the paper / reference README (Lslland/T-Vaccine)."""

    rho: float = Field(3.0, gt=0)
    layers_per_step: int = Field(8, gt=0)
    """S: layers perturbed and trained at a time (clamped to the layer count, with a warning)."""
    score_every: int = Field(200, gt=0)
    """K: steps between layer-score refreshes."""
    resample_every: int = Field(20, gt=0)
    """J: steps between layer draws."""
    score_batch_size: int = Field(8, gt=0)
    """Harmful examples per scoring batch, drawn from ``align.data.harmful`` (the reference used one)."""
    checkpoint_inactive: bool = True
    """Run frozen layers under activation checkpointing (the memory saving; results are unchanged)."""


def set_checkpointing(layer: torch.nn.Module, on: bool) -> None:
    """Recompute ``layer``'s activations in backward instead of storing them."""
    if on and "forward" not in layer.__dict__:
        forward = layer.forward
        layer.forward = lambda *args, **kwargs: torch.utils.checkpoint.checkpoint(
            forward, *args, use_reentrant=False, **kwargs
        )
    elif not on:
        layer.__dict__.pop("forward", None)


@ALIGN_METHODS.register("t-vaccine")
class TVaccineTrainer(VaccineTrainer):
    Params = TVaccineParams

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        n_layers = len(self.layout)
        if self.params.layers_per_step > n_layers:
            warnings.warn(f"t-vaccine: layers_per_step={self.params.layers_per_step} exceeds the model's "
                          f"{n_layers} layers; using all {n_layers}")
        self.n_active = min(self.params.layers_per_step, n_layers)
        self.harmful = self.extra_data.get("harmful") or []
        if not self.harmful:
            raise ValueError("t-vaccine scores layers on harmful data: align.data.harmful must not be empty")
        self.layer_params = [[p for p in layer.parameters() if p.requires_grad] for layer in self.layout.layers]
        self.scores: torch.Tensor | None = None
        self.active: list[int] = []
        self.draws: list[dict] = []  # (step, active layers): the schedule, for audit and tests
        self.scorings: list[dict] = []  # (step, per-layer scores), reported with the draws

    def _generator(self, salt: int) -> torch.Generator:
        # derived from (seed, step): identical on every rank and after a resume, with no state to save
        return generator(self.seed, "t-vaccine", self.step, salt)

    def on_step_start(self) -> None:
        if self.scores is None or self.step % self.params.score_every == 0:
            self.scores = self.layer_scores()
            self.scorings.append({"step": self.step, "scores": [round(float(s), 6) for s in self.scores]})
        if not self.active or self.step % self.params.resample_every == 0:
            self.activate(self.sample_layers(self.scores, self.n_active, self._generator(1)))
            self.draws.append({"step": self.step, "layers": self.active})

    def layer_scores(self) -> torch.Tensor:
        """||d loss_harmful / d attention output|| per layer, on a random harmful batch."""
        pick = torch.randperm(len(self.harmful), generator=self._generator(0))[: self.params.score_batch_size]
        batch = self.collate([self.harmful[i] for i in pick.tolist()])
        batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
        every = list(range(len(self.layout)))
        for i, layer in enumerate(self.layout.layers):  # only activation gradients are wanted: store nothing
            set_checkpointing(layer, self.params.checkpoint_inactive)
        grads = self.attention_gradients(batch, every)
        self.activate(self.active)
        return torch.stack([grads[i].float().norm() for i in every]).cpu()

    def sample_layers(self, scores: torch.Tensor, k: int, generator: torch.Generator) -> list[int]:
        """k distinct layers, drawn with probability proportional to ``scores``."""
        weights = scores.double().clamp(min=0)
        # a layer with zero score stays drawable with negligible weight, so k draws always exist
        weights = torch.ones_like(weights) if weights.max() <= 0 else weights.clamp(min=float(weights.max()) * 1e-9)
        chosen = torch.multinomial(weights, k, replacement=False, generator=generator)
        from accelerate.utils import broadcast

        return sorted(broadcast(chosen.to(self.accelerator.device)).tolist())

    def activate(self, layers: list[int]) -> None:
        self.active = list(layers)
        for i, (layer, params) in enumerate(zip(self.layout.layers, self.layer_params)):
            on = i in self.active
            for p in params:
                p.requires_grad_(on)
                if not on:
                    p.grad = None
            set_checkpointing(layer, self.params.checkpoint_inactive and not on)

    def perturbed_layers(self) -> list[int]:
        return self.active

    def active_steps_per_layer(self) -> list[int]:
        """How many steps each layer was perturbed and trained, from the draws so far."""
        counts = [0] * len(self.layout)
        ends = [d["step"] for d in self.draws[1:]] + [self.step]
        for draw, end in zip(self.draws, ends):
            for i in draw["layers"]:
                counts[i] += end - draw["step"]
        return counts

    def train(self) -> dict:
        return super().train() | {"layer_scorings": self.scorings, "layer_draws": self.draws,
                                  "active_steps_per_layer": self.active_steps_per_layer()}

    def method_state(self) -> dict:
        return super().method_state() | {"scores": self.scores, "active": self.active, "draws": self.draws,
                                         "scorings": self.scorings}

    def load_method_state(self, state: dict) -> None:
        super().load_method_state(state)
        self.scores, self.draws, self.scorings = state["scores"], state["draws"], state["scorings"]
        self.activate(state["active"])

    def finish(self) -> None:
        for layer, params in zip(self.layout.layers, self.layer_params):
            set_checkpointing(layer, False)
            for p in params:
                p.requires_grad_(True)
        super().finish()
