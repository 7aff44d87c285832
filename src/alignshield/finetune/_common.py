"""What the fine-tune-stage baselines share: the alignment pool, and the aligned model as a reference.

At trainer init the model is the aligned model: base with LoRA #1 merged plus a zero-initialised
LoRA #2 (two-lora), or base plus LoRA #1 about to be trained further (single-lora). So the values of
the trainable parameters at init ARE the aligned model's, in both topologies; ``AlignedReference``
keeps a copy of them and runs the current model with those values swapped in (``functional_call``,
no autograd). Unlike peft's ``disable_adapter()`` this is also right for single-lora, where disabling
the adapter would drop the alignment itself.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from alignshield.data.collate import Tokenized
from alignshield.models.layers import attention_output


def alignment_pool(trainer, method: str) -> list[Tokenized]:
    pool = trainer.extra_data.get("alignment") or []
    if not pool:
        raise ValueError(f"{method} needs alignment data (harmful prompts with safe answers): "
                         "align.data.safety must not be empty")
    return pool


class AlignedReference:
    """The aligned model's outputs on a batch: the model with its trainable parameters at their init values."""

    def __init__(self, names: list[str], params: list[torch.Tensor]):
        self.values = {n: p.detach().clone() for n, p in zip(names, params)}

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor], **kwargs):
        was_training = model.training
        model.eval()  # a reference is deterministic: no dropout
        try:
            with torch.no_grad():
                return torch.func.functional_call(
                    model, self.values, args=(),
                    kwargs={"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], **kwargs},
                    strict=False,
                )
        finally:
            model.train(was_training)


@contextmanager
def capture_outputs(modules: list[nn.Module]):
    """Inside the block, every forward of ``modules[i]`` appends its output hidden states to ``out[i]``."""
    out: list[list[torch.Tensor]] = [[] for _ in modules]

    def hook_for(i: int):
        def hook(module, args, output):
            out[i].append(attention_output(output))

        return hook

    handles = [m.register_forward_hook(hook_for(i)) for i, m in enumerate(modules)]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()
