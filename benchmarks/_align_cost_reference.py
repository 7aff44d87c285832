"""PORT FOR TIMING ONLY -- not an alignshield method, never registered, never used to train models.

git-disl/Vaccine @ 8937f68, trainer.py:53-181 (``VaccineTrainer.training_step``), on alignshield's loop:
pass 1 is a normal forward + ``loss.backward()`` (parameter gradients included) with backward hooks on
every attention block capturing dL/d(attention output); ``model.zero_grad()`` throws the parameter
gradients away; e_l = rho * g_l / (||g|| + 1e-7) with one global norm; pass 2 adds e_l to the attention
outputs through ``.data`` (a constant to autograd) and its backward drives the optimizer step.
``register_full_backward_hook`` replaces the deprecated ``register_backward_hook``; the compute is the same.

Imported only by the ``reference-vaccine`` worker of ``align_cost.py`` (it imports torch).
"""

from __future__ import annotations

import warnings

import torch

from alignshield.align.vaccine import VaccineParams
from alignshield.models.layers import discover
from alignshield.train import Trainer

# expected: the attention block gets its tensors as keyword arguments, so the hook sees no grad_input
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")


class ReferenceVaccinePort(Trainer):
    Params = VaccineParams

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.attentions = discover(self.unwrapped_model()).attentions  # V: isinstance(LlamaAttention)

    def training_step(self, batch):
        model, ga, grads = self.model, self.args.grad_accum, {}

        def capture(i):  # V :93-96
            def hook(module, grad_input, grad_output):
                grads[i] = grad_output[0].detach().clone() / ga
            return hook

        handles = [m.register_full_backward_hook(capture(i)) for i, m in enumerate(self.attentions)]
        self.accelerator.backward(self.compute_loss(model, batch))  # pass 1: full forward + backward (V :83)
        for h in handles:
            h.remove()
        norm = torch.norm(torch.stack([torch.norm(g, 2) for g in grads.values()]), 2)  # V _grad_norm :168-181
        e = {i: self.params.rho * g / (norm + 1e-7) for i, g in grads.items()}  # V :149-151
        model.zero_grad()  # V :85: the pass-1 parameter gradients are discarded

        def perturb(i):  # V :112-121
            def hook(module, args, output):
                output[0].data = output[0] + e[i]
            return hook

        handles = [m.register_forward_hook(perturb(i)) for i, m in enumerate(self.attentions)]
        loss = self.compute_loss(model, batch)  # pass 2 (V :87)
        self.accelerator.backward(loss / ga)
        for h in handles:
            h.remove()
        return loss.detach()
