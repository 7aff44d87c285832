"""Vaccine: perturbation-aware alignment (Huang et al., NeurIPS 2024, arXiv 2402.01109).

Each step, pass 1 takes the gradient g_l of the alignment loss with respect to every decoder layer's
self-attention output (activation gradients only: no parameter gradient is formed); the perturbation
is e_l = rho * g_l / ||g||, with one norm over all layers together. Pass 2 adds e_l (a constant, no
gradient flows through it) to those outputs, and the optimizer steps on the gradient of that
perturbed loss. ``random-vaccine`` is the paper's ablation: a random e of the same global norm,
placed where Vaccine's is: on the batch's real tokens (Vaccine's gradient is exactly 0 at padding).
"""

from __future__ import annotations

from typing import Callable

import torch
from pydantic import Field

from alignshield.align import ALIGN_METHODS
from alignshield.config import MethodParams
from alignshield.models.layers import add_to_attention_outputs
from alignshield.seeding import generator
from alignshield.train import Trainer

NORM_EPS = 1e-7  # as the reference; keeps an all-zero gradient from dividing by zero


class VaccineParams(MethodParams):
    """Vaccine's settings. Paper and reference scripts: rho = 2 (git-disl/Vaccine, script/vaccine)."""

    rho: float = Field(2.0, gt=0)
    """Global L2 norm of the perturbation over all perturbed layers and the batch's tokens."""
    refresh_every: int = Field(1, gt=0)
    """1 = the paper's exact method (a fresh pass 1 every step). k > 1 = our cheaper mode: the
    direction is recomputed every k steps and reused in between (as efficient SAM variants do).
    Batches differ in shape, so a reused direction is one vector per layer, shared by every token
    (the sum over tokens of g_l), rescaled to global norm rho over the current batch's tokens."""


def scale_to_norm(tensors: list[torch.Tensor], rho: float) -> list[torch.Tensor]:
    """rho * t / ||(t_1, ..., t_L)||: one norm over all tensors together, computed in float32.

    The tensors may live on different devices (layers spread by a ``device_map``): the norm is
    summed on the first one's and each tensor is scaled on its own."""
    home = tensors[0].device
    norm = torch.sqrt(sum(t.float().pow(2).sum().to(home) for t in tensors))
    return [(t.float() * (rho / (norm.to(t.device) + NORM_EPS))).to(t.dtype) for t in tensors]


@ALIGN_METHODS.register("vaccine")
class VaccineTrainer(Trainer):
    Params = VaccineParams
    shares_prefix = False  # the perturbation differs per row at every position
    compiles = False  # hooks on every attention output, added and removed each step

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.layout = self.discover_layers()
        self.shared_direction: dict[int, torch.Tensor] | None = None
        self.last_norm: float | None = None
        """The global norm of the last micro-batch's perturbation (rho, up to float error), when tracked."""

    def perturbed_layers(self) -> list[int]:
        return list(range(len(self.layout)))

    # ------------------------------------------------------------------ the two passes

    def attention_gradients(self, batch: dict[str, torch.Tensor], layers: list[int]) -> dict[int, torch.Tensor]:
        """Pass 1: d loss / d (attention output of each layer in ``layers``), and nothing else.

        A zero tensor is added to each output and differentiated: its gradient is the output's, it
        exists even where no parameter upstream requires grad, and ``autograd.grad`` leaves every
        parameter's ``.grad`` untouched (the reference zeroed them instead, which breaks gradient
        accumulation).
        """
        zeros: dict[int, torch.Tensor] = {}

        def zero_leaf(i: int, h: torch.Tensor) -> torch.Tensor:
            # setdefault: under activation checkpointing the hook runs again on recompute
            return zeros.setdefault(layers[i], torch.zeros_like(h, requires_grad=True))

        with self.accelerator.no_sync(self.model), add_to_attention_outputs(
            [self.layout.attentions[i] for i in layers], zero_leaf
        ):
            loss = self.compute_loss(self.model, batch)
            grads = torch.autograd.grad(loss, [zeros[i] for i in layers])
        return dict(zip(layers, grads))

    def perturbation(self, batch: dict[str, torch.Tensor], layers: list[int]) -> dict[int, torch.Tensor]:
        """e_l for this batch: exact (pass 1 on this batch) or, in the cheaper mode, the shared
        direction refreshed every ``refresh_every`` steps."""
        rho, k = self.params.rho, self.params.refresh_every
        if k == 1:
            grads = self.attention_gradients(batch, layers)
            return dict(zip(grads, scale_to_norm(list(grads.values()), rho)))
        if self.shared_direction is None or self.step % k == 0 or set(self.shared_direction) != set(layers):
            grads = self.attention_gradients(batch, layers)
            self.shared_direction = {i: g.float().sum(dim=tuple(range(g.dim() - 1))) for i, g in grads.items()}
        tokens = batch["attention_mask"].sum().clamp(min=1)
        per_token = scale_to_norm(list(self.shared_direction.values()), rho / float(tokens.sqrt()))
        return dict(zip(self.shared_direction, per_token))

    def training_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        layers = self.perturbed_layers()
        e = {i: t.detach() for i, t in self.perturbation(batch, layers).items()}
        if self.tracking:  # only a tracker reads it: no device sync per step otherwise
            self.last_norm = float(torch.sqrt(sum(t.float().pow(2).sum().cpu() for t in e.values())))
        return self.perturbed_step(batch, layers, lambda i, h: e[layers[i]].to(h.dtype))

    def signals(self) -> dict[str, float]:
        return {} if self.last_norm is None else {"vaccine/perturbation_norm": self.last_norm}

    def perturbed_step(self, batch: dict[str, torch.Tensor], layers: list[int],
                       delta: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Pass 2: the loss with h_l + delta(i, h_l) at ``layers[i]``, and its backward."""
        with add_to_attention_outputs([self.layout.attentions[i] for i in layers], delta):
            loss = self.compute_loss(self.model, batch)
        self.accelerator.backward(loss / self.args.grad_accum)
        return loss.detach()

    def method_state(self) -> dict:
        return {"shared_direction": self.shared_direction}

    def load_method_state(self, state: dict) -> None:
        self.shared_direction = state["shared_direction"]


@ALIGN_METHODS.register("random-vaccine")
class RandomVaccineTrainer(VaccineTrainer):
    """The paper's ablation: e is Gaussian noise scaled to the same global norm rho, no pass 1.

    The noise sits where Vaccine's perturbation does: on the real tokens (attention mask 1), exactly
    0 at padding, so all of rho lands on real tokens whatever the padding. Its width is the hooked
    attention output's own (not the embedding width, which differs on e.g. OPT-350m)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.noise = generator(self.seed, "random-vaccine", self.accelerator.process_index)

    def attention_width(self) -> int:
        """The width of the attention outputs as the model config states it (the residual stream)."""
        config = self.unwrapped_model().config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        return int(config.hidden_size)

    def perturbation(self, batch: dict[str, torch.Tensor], layers: list[int],
                     width: int | None = None) -> dict[int, torch.Tensor]:
        """Fresh noise for ``batch``: standard normal at the real positions, 0 at padding, then one
        global scale to norm rho. ``width`` defaults to the config's; training passes the hooked
        attention output's."""
        mask = batch["attention_mask"].bool().cpu()
        shape, real = (*mask.shape, width or self.attention_width()), int(mask.sum())
        noise = []
        for _ in layers:
            e = torch.zeros(shape)
            e[mask] = torch.randn(real, shape[-1], generator=self.noise)
            noise.append(e)
        device = batch["input_ids"].device
        return {i: t.to(device) for i, t in zip(layers, scale_to_norm(noise, self.params.rho))}

    def training_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        layers = self.perturbed_layers()
        drawn: dict[int, torch.Tensor] = {}

        def noise(i: int, h: torch.Tensor) -> torch.Tensor:
            # the first perturbed attention output sizes the noise of every layer; it is drawn once
            # per micro-batch, so a checkpointed recompute sees the same noise
            if not drawn:
                drawn.update(self.perturbation(batch, layers, width=h.shape[-1]))
            e = drawn[layers[i]]
            if e.shape != h.shape:
                raise RuntimeError(f"random-vaccine: layer {layers[i]}'s attention output has shape "
                                   f"{tuple(h.shape)}, the noise {tuple(e.shape)}")
            return e.to(device=h.device, dtype=h.dtype)

        return self.perturbed_step(batch, layers, noise)

    def method_state(self) -> dict:
        return super().method_state() | {"noise": self.noise.get_state()}

    def load_method_state(self, state: dict) -> None:
        super().load_method_state(state)
        self.noise.set_state(state["noise"])
