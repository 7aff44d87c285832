"""T-Vaccine: targeted Vaccine on safety-critical layers (Liu et al., 2024, arXiv 2410.09760).

Every K steps each layer is scored by the norm of the gradient of a harmful-data loss with respect
to its attention output; every J steps S layers are sampled without replacement with probability
proportional to the scores. Only those layers are perturbed (Vaccine's e, with the global norm over
them). Which LoRA parameters train is ``inactive``: by default, as the reference (Lslland/T-Vaccine),
only the drawn layers' attention LoRA trains and the MLP LoRA (everything trainable outside the
attention blocks) trains in every layer; ``freeze-all`` freezes all LoRA of the layers not drawn.
Layers not drawn run under activation checkpointing, so their activations are not kept and memory
falls; the checkpointing is non-reentrant, so it is exact in both modes, including the gradient of
the MLP LoRA that still trains inside a checkpointed layer.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

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
    """S: layers perturbed (and whose attention LoRA trains) at a time (clamped to the layer count, with a warning)."""
    score_every: int = Field(200, gt=0)
    """K: steps between layer-score refreshes."""
    resample_every: int = Field(20, gt=0)
    """J: steps between layer draws."""
    score_batch_size: int = Field(8, gt=0)
    """Harmful examples per scoring batch, drawn from ``align.data.harmful`` (the reference used one)."""
    inactive: Literal["freeze-attention", "freeze-all"] = "freeze-attention"
    """What the layers not drawn freeze. ``freeze-attention`` (the reference, trainer.py:240-249): their
    attention LoRA only; the MLP LoRA trains in every layer at every step. ``freeze-all``: all their LoRA,
    attention and MLP, so only the S drawn layers train."""
    checkpoint_inactive: bool = True
    """Run the layers not drawn under non-reentrant activation checkpointing (the memory saving; the
    reference does it too). Exact in both modes: the gradient of MLP LoRA that trains inside a
    checkpointed layer comes from the recomputation, which replays the same RNG (dropout)."""


_RECORD = "_alignshield_checkpointing"  # on the layer: (our wrapper, the instance forward it displaced)


def set_checkpointing(layer: torch.nn.Module, on: bool) -> None:
    """Recompute ``layer``'s activations in backward instead of storing them.

    Composes with an instance ``forward`` that is already there: accelerate's device hooks
    (``add_hook_to_module``, put on every dispatched block by ``device_map``) live there, with the
    original forward kept as ``_old_forward``. Ours wraps whatever ``layer.forward`` is (so the hook
    runs inside the checkpoint, and again on recompute), and switching off puts back exactly what it
    displaced. If a hook was added on top of ours, ours is found in ``_old_forward`` and unwrapped
    there. Ours is recognised by identity (a record on the layer), not by a mark on the function:
    ``functools.update_wrapper``, which accelerate uses, copies a wrapped function's attributes.
    """
    record = layer.__dict__.get(_RECORD)
    top = record is not None and layer.__dict__.get("forward") is record[0]
    under_hook = record is not None and layer.__dict__.get("_old_forward") is record[0]
    if on and not (top or under_hook):
        previous = layer.__dict__.get("forward")  # None: there is no instance forward
        inner = layer.forward  # bound: the instance forward (e.g. accelerate's) or the class's

        def forward(*args, **kwargs):
            return torch.utils.checkpoint.checkpoint(inner, *args, use_reentrant=False, **kwargs)

        layer.__dict__[_RECORD] = (forward, previous)
        layer.forward = forward
    elif not on and record is not None:
        previous = record[1]
        if top and previous is None:
            del layer.__dict__["forward"]
        elif top:
            layer.forward = previous
        elif under_hook:  # what the hook would hold had ours never been there
            layer._old_forward = previous if previous is not None else type(layer).forward.__get__(layer)
        del layer.__dict__[_RECORD]


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
        # the parameters that train only while their layer is drawn; every other trainable parameter
        # (with freeze-attention: the MLP LoRA of every layer) trains at every step
        scope = self.layout.attentions if self.params.inactive == "freeze-attention" else self.layout.layers
        self.layer_params = [[p for p in module.parameters() if p.requires_grad] for module in scope]
        if not any(self.layer_params):
            warnings.warn(f"t-vaccine ({self.params.inactive}): no trainable parameter in the "
                          f"{'attention blocks' if scope is self.layout.attentions else 'decoder layers'}; "
                          "the layer draws only choose where to perturb")
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
        for layer in self.layout.layers:  # only activation gradients are wanted: store nothing
            set_checkpointing(layer, self.params.checkpoint_inactive)
        grads = self.attention_gradients(batch, every)
        self.activate(self.active)
        # each norm to the CPU before stacking: under a device_map the layers live on different devices
        return torch.stack([grads[i].float().norm().cpu() for i in every])

    def sample_layers(self, scores: torch.Tensor, k: int, generator: torch.Generator) -> list[int]:
        """k distinct layers, drawn with probability proportional to ``scores``."""
        weights = scores.double().clamp(min=0)
        # a layer with zero score stays drawable with negligible weight, so k draws always exist
        weights = torch.ones_like(weights) if weights.max() <= 0 else weights.clamp(min=float(weights.max()) * 1e-9)
        chosen = torch.multinomial(weights, k, replacement=False, generator=generator)
        from accelerate.utils import broadcast

        return sorted(broadcast(chosen.to(self.accelerator.device)).tolist())

    def activate(self, layers: list[int]) -> None:
        """Draw ``layers``: their selective parameters train, the others' freeze, and the layers not
        drawn run checkpointed. Called at optimizer-step boundaries only (no gradient is pending)."""
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

    def signals(self) -> dict[str, Any]:
        return super().signals() | {"tvaccine/active_layers": " ".join(map(str, self.active)),
                                    "tvaccine/n_active": len(self.active)}

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
