"""``surgery``: sink-divergence suppression during the fine-tune (Surgery, Lslland/Surgery).

A provider's fine-tune defence. Every step, besides the user's batch, the model reads one harmful
text h (a harmful prompt with its harmful answer) and one harmless text s, with attention weights
returned. For every attention head (layer l, head k) the sink attention is the mean attention that
positions 1.. pay to the sink position (0):

    sink_lk(x) = mean_{t >= 1} attn_lk(x)[t, 0]
    L = CE + alpha * mean_{l, k} ReLU(sink_lk(h) - sink_lk(s))

which pushes each head towards attending less to the sink on harmful text than on harmless text (the
paper's "negative sink divergence"). Gradients flow through both extra forwards.

Reference: Lslland/Surgery at ``ea5f29f``: ``trainer.py:78-125`` (the sink mean ``:78-87``, the loss
``:105-117``; one harmful and one harmless text drawn per step with ``random.choice``, ``:96-97``),
alpha 300 and sink position 0 in ``script/finetune/surgery_poison_ratio.sh:16-17``, eager attention in
``train.py:479``. Deviations, named:

* Texts: the reference draws from the first 1,000 unsafe and 1,000 safe rows of BeaverTails 30k_train;
  ours draws harmful texts from ``align.data.harmful`` (BeaverTails harmful pairs) and harmless ones
  from ``align.data.safety`` (harmful prompts with safe answers), each tokenised with the run's
  template and ``finetune.train.max_length`` (the reference: the chat template, 512 tokens).
* Draws are determined by (seed, step, micro-batch, DDP rank), so a resumed run draws the same texts;
  the reference uses ``random.seed(43)`` once.
* The reference fine-tunes every weight; ours trains the config's topology (``finetune.topology=full``
  for the reference's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from alignshield.config import MethodParams
from alignshield.finetune import FINETUNE_METHODS
from alignshield.finetune._common import alignment_pool
from alignshield.seeding import generator
from alignshield.train import Trainer


class SurgeryParams(MethodParams):
    """Surgery's settings; the defaults are the reference script's (``surgery_poison_ratio.sh:16-17``)."""

    alpha: float = Field(300.0, ge=0)
    """Weight of the sink-divergence penalty. 0 = plain SFT."""
    sink_position: int = Field(0, ge=0)
    """The sink token's position (0: the first token)."""


def sink_attention(attentions: tuple[torch.Tensor, ...], sink: int) -> torch.Tensor:
    """(layers x heads) mean attention paid to position ``sink`` by the positions after 0, over the batch
    (``attentions``: one (batch, heads, query, key) tensor per layer, as transformers returns them)."""
    return torch.stack([a[:, :, 1:, sink].mean(dim=(0, 2)) for a in attentions])


@FINETUNE_METHODS.register("surgery")
class SurgeryTrainer(Trainer):
    Params = SurgeryParams
    uses_harmful = True
    """Gets ``align.data.harmful`` as extra data."""
    needs_attention_weights = True
    """Needs the attention weights returned: model.attn_implementation=eager."""
    compiles = False  # reads every head's attention weights

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.harmful = self.extra_data.get("harmful") or []
        if not self.harmful:
            raise ValueError("surgery compares sink attention on harmful text: align.data.harmful must not be empty")
        self.harmless = alignment_pool(self, "surgery")
        self._micro = 0

    def on_step_start(self) -> None:
        self._micro = 0

    def _draw(self, pool: list, which: str) -> dict[str, torch.Tensor]:
        g = generator(self.seed, "surgery", which, self.step, self._micro, self.accelerator.process_index)
        batch = self.collate([pool[int(torch.randint(len(pool), (1,), generator=g))]])
        return {k: v.to(self.accelerator.device) for k, v in batch.items() if k != "labels"}

    def sink_divergence(self, model) -> torch.Tensor:
        """mean over heads of ReLU(sink(harmful text) - sink(harmless text)), with gradients."""
        sinks = []
        for pool, which in ((self.harmful, "harmful"), (self.harmless, "harmless")):
            attentions = model(**self._draw(pool, which), output_attentions=True).attentions
            if not attentions or attentions[0] is None:
                raise ValueError("surgery needs the attention weights, which this model's attention does not "
                                 "return: set model.attn_implementation=eager")
            sinks.append(sink_attention(attentions, self.params.sink_position))
        return F.relu(sinks[0] - sinks[1]).mean()

    def compute_loss(self, model, batch):
        loss = super().compute_loss(model, batch)
        if self.params.alpha:
            loss = loss + self.params.alpha * self.sink_divergence(model)
        self._micro += 1
        return loss
