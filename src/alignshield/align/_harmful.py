"""What the alignment methods that train against harmful data share (RepNoise, Booster, TAR).

``HarmfulBatches``: a Trainer that draws harmful batches (``align.data.harmful``) determined by (seed,
step, micro-batch, salt, DDP rank), so a resumed run draws the same ones without saved state, plus
gradients taken without touching ``.grad`` and added to it later. ``restored``: weights shifted in
place for a lookahead (Booster's simulated step, TAR's simulated attack) come back bit for bit.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from alignshield.seeding import generator
from alignshield.train import Trainer


@contextmanager
def restored(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Inside the block ``params`` may be changed in place; on exit (even by an exception) they hold
    exactly the values they had on entry."""
    saved = [p.detach().clone() for p in params]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


class HarmfulBatches(Trainer):
    """A Trainer that draws harmful batches (``align.data.harmful``) of the training batch size."""

    method_name = "this method"
    compiles = False  # RepNoise / Booster / TAR read or perturb inside the layers

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.harmful = self.extra_data.get("harmful") or []
        if not self.harmful:
            raise ValueError(f"{self.method_name} trains on harmful data: align.data.harmful must not be empty")
        self._micro = 0

    def on_step_start(self) -> None:
        self._micro = 0

    def harmful_batch(self, salt: int = 0) -> dict[str, torch.Tensor]:
        """A random harmful batch determined by (seed, step, micro-batch index, salt, DDP rank): each rank
        draws its own, and a resumed run draws what an uninterrupted one would."""
        g = generator(self.seed, "harmful-batch", self.step, self._micro, salt, self.accelerator.process_index)
        pick = torch.randint(len(self.harmful), (self.args.batch_size,), generator=g).tolist()
        batch = self.collate([self.harmful[i] for i in pick])
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    def training_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        try:
            return self.method_step(batch)
        finally:
            self._micro += 1

    def method_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return super().training_step(batch)

    def params_with_grad(self) -> list[torch.nn.Parameter]:
        return [p for p in self.trainable if p.requires_grad]

    def loss_gradient(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(CE on ``batch``, its gradient w.r.t. the trainable parameters), leaving ``.grad`` untouched."""
        params = self.params_with_grad()
        with self.accelerator.no_sync(self.model):
            loss = self.compute_loss(self.model, batch)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        return loss.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]

    def add_gradient(self, tensors: list[torch.Tensor]) -> None:
        """``.grad += t / grad_accum`` (averaged over processes under DDP, as backward's gradients are)."""
        for p, t in zip(self.params_with_grad(), tensors):
            t = t.detach() / self.args.grad_accum
            if self.accelerator.num_processes > 1:
                t = self.accelerator.reduce(t.contiguous(), reduction="mean")
            p.grad = t.to(p.dtype).clone() if p.grad is None else p.grad + t.to(p.grad.dtype)
