"""Lisa: lazy safety alignment (Huang et al., NeurIPS 2024, arXiv 2405.18641; reference ``ADMMTrainer``
in git-disl/Lisa).

Bi-state optimisation: the run alternates an alignment phase (steps on alignment data, harmful
prompts with safe answers) and a fine-tune phase (steps on the user's data), alignment first, as
the reference. After a warm-up (step > ``proximal_warmup`` * total steps) each step's loss gets the
proximal term rho/2 * ||w - w_other||^2, with w_other the weights at the end of the OTHER state's
last phase (both start as the initial weights, as the reference).

Phase lengths: ``alignment_steps`` / ``finetune_steps`` (100 / 900, the reference scripts). A run
shorter than one cycle scales both by total_steps / (alignment_steps + finetune_steps), each rounded
and at least 1, so it still does one alignment phase then fine-tuning in the paper's 1:9 ratio
(60 steps: 6 alignment + 54 fine-tune); longer runs use the lengths as given.
"""

from __future__ import annotations

import torch
from pydantic import Field

from alignshield.config import MethodParams
from alignshield.finetune import FINETUNE_METHODS
from alignshield.finetune._common import alignment_pool
from alignshield.seeding import generator
from alignshield.train import Trainer

ALIGNMENT, FINETUNE = "alignment", "finetune"


class LisaParams(MethodParams):
    """Lisa's settings; defaults from git-disl/Lisa script/finetune/lisa_poison_ratio.sh (RHO=1,
    align_step=100, finetune_step=900) and its trainer (proximal term after 10% of the steps)."""

    rho: float = Field(1.0, ge=0)
    """Weight of the proximal term rho/2 ||w - w_other||^2. 0 = plain alternation (bi-state SFT)."""
    alignment_steps: int = Field(100, gt=0)
    """Optimizer steps of each alignment phase."""
    finetune_steps: int = Field(900, gt=0)
    """Optimizer steps of each fine-tune phase."""
    scale_to_run: bool = True
    """Scale both phase lengths to a run shorter than one cycle (see the module docstring)."""
    proximal_warmup: float = Field(0.1, ge=0, le=1)
    """The proximal term applies once step > proximal_warmup * total steps."""


@FINETUNE_METHODS.register("lisa")
class LisaTrainer(Trainer):
    Params = LisaParams
    compiles = False  # switches between alignment and fine-tune data and adapters mid-run

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.alignment = alignment_pool(self, "lisa")
        a, f = self.params.alignment_steps, self.params.finetune_steps
        if self.params.scale_to_run and self.total_steps < a + f:
            scale = self.total_steps / (a + f)
            a, f = max(1, round(a * scale)), max(1, round(f * scale))
        self.phase_steps = {ALIGNMENT: a, FINETUNE: f}
        initial = [p.detach().clone() for p in self.trainable]
        self.anchors = {ALIGNMENT: initial, FINETUNE: [w.clone() for w in initial]}
        """anchors[s]: the weights at the end of state s's last phase."""
        self.state = ALIGNMENT
        self.micro = 0
        self.phases: list[str] = []  # the state of each step, for audit and tests

    def phase(self, step: int) -> str:
        return ALIGNMENT if step % (self.phase_steps[ALIGNMENT] + self.phase_steps[FINETUNE]) < \
            self.phase_steps[ALIGNMENT] else FINETUNE

    def on_step_start(self) -> None:
        state = self.phase(self.step)
        if self.step > 0 and state != self.phase(self.step - 1):
            self.anchors[self.phase(self.step - 1)] = [p.detach().clone() for p in self.trainable]
        self.state, self.micro = state, 0
        self.phases.append(state)

    def alignment_batch(self) -> dict[str, torch.Tensor]:
        """batch_size alignment pairs drawn from (seed, step, micro-batch, rank): resumable with no state."""
        g = generator(self.seed, "lisa-alignment-batch", self.step, self.micro, self.accelerator.process_index)
        pick = torch.randperm(len(self.alignment), generator=g)
        items = [self.alignment[i] for i in pick[: self.args.batch_size].tolist()]
        return {k: v.to(self.accelerator.device) for k, v in self.collate(items).items()}

    def proximal(self, other: list[torch.Tensor]) -> torch.Tensor:
        """1/2 * ||w - w_other||^2 over the trainable parameters."""
        dtype = torch.promote_types(self.trainable[0].dtype, torch.float32)
        return 0.5 * sum((p.to(dtype) - o.to(dtype)).pow(2).sum() for p, o in zip(self.trainable, other))

    def proximal_active(self) -> bool:
        return bool(self.params.rho) and self.step > self.params.proximal_warmup * self.total_steps

    def training_step(self, batch):
        if self.state == ALIGNMENT:
            batch = self.alignment_batch()  # the user batch is consumed and dropped, as the reference
        self.micro += 1
        loss = self.compute_loss(self.model, batch)
        if self.proximal_active():
            other = self.anchors[FINETUNE if self.state == ALIGNMENT else ALIGNMENT]
            loss = loss + self.params.rho * self.proximal(other)
        self.accelerator.backward(loss / self.args.grad_accum)
        return loss.detach()

    def method_state(self) -> dict:
        return {"anchors": {s: [w.cpu() for w in ws] for s, ws in self.anchors.items()}}

    def load_method_state(self, state: dict) -> None:
        device = self.trainable[0].device
        self.anchors = {s: [w.to(device) for w in ws] for s, ws in state["anchors"].items()}

    def train(self):
        report = super().train()
        return report | {"alignment_phase_steps": self.phase_steps[ALIGNMENT],
                         "finetune_phase_steps": self.phase_steps[FINETUNE],
                         "alignment_steps_run": sum(self.phase(s) == ALIGNMENT for s in range(self.total_steps))}
